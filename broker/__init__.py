"""gRPC connection broker: one owner for every long-lived upstream messaging session."""

from broker import compat

compat.install()  # before any library waits: see broker/compat.py

__version__ = "0.1.0"
