"""Tests of the pure session lifecycle (no I/O)."""
