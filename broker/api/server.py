"""Builds the grpc.aio server: the Broker service plus standard health and reflection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker.api.servicer import BrokerServicer
from broker.api.status import MalformedRequests
from broker.engines.status import EngineStatus
from broker.runtime.manager import SessionManager
from broker_client.v1 import broker_pb2, broker_pb2_grpc

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name
MESSAGE_OVERHEAD_BYTES = 4 * 1024 * 1024
"""Room beside the largest medium in one gRPC message: body, caption, fields, framing."""


def message_limit(max_media_bytes: int) -> int:
    """The gRPC message size limit that fits a Send with the largest medium accepted
    (gRPC's default of 4 MiB would refuse it before the broker could say why)."""
    return max_media_bytes + MESSAGE_OVERHEAD_BYTES


class ApiServer:
    def __init__(
        self,
        manager: SessionManager,
        listen: str,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        credentials: grpc.ServerCredentials | None = None,
        durability: str = "",
        engine: Callable[[], EngineStatus] | None = None,
    ) -> None:
        """`interceptors`: e.g. broker.api.auth; `credentials`: TLS (None: plaintext);
        `durability`: what a crash of the store can lose, and `engine`: whether the
        engine is up, both for Health."""
        limit = message_limit(manager.settings.max_media_bytes)
        self.server = grpc.aio.server(
            # Innermost: undecodable requests become INVALID_ARGUMENT, not UNKNOWN.
            interceptors=[*interceptors, MalformedRequests()],
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Calls core queues for the handlers while the loop is busy (config.py).
                ("grpc.server.max_pending_requests", manager.settings.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit",
                 3 * manager.settings.max_pending_calls),
            ]
        )
        broker_pb2_grpc.add_BrokerServicer_to_server(BrokerServicer(manager, durability, engine),
                                                  self.server)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = (
            self.server.add_secure_port(listen, credentials)
            if credentials is not None
            else self.server.add_insecure_port(listen)
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        host = listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
