"""Typed Python client for the session broker."""
