"""The gRPC edge: thin servicers over the session manager."""
