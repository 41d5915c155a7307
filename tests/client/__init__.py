"""Tests of the Python client against scripted in-process grpc.aio servers."""
