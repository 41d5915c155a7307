"""gRPC connection broker: one owner for every long-lived upstream messaging session."""

__version__ = "0.1.0"
