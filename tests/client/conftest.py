"""Fixtures: a real grpc.aio server on 127.0.0.1:<ephemeral> running a ScriptedBroker."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import grpc.aio
import pytest

from broker_client import BrokerClient
from broker_client.v1 import broker_pb2_grpc

from .fake_broker import ScriptedBroker


@pytest.fixture
def broker() -> ScriptedBroker:
    return ScriptedBroker()


@pytest.fixture
async def target(broker: ScriptedBroker) -> AsyncIterator[str]:
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(broker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def client(target: str) -> AsyncIterator[BrokerClient]:
    async with BrokerClient(target, timeout=10.0, retry_attempts=5) as c:
        yield c


@pytest.fixture
def dead_target() -> str:
    """An address nobody listens on (the port was just free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"
