"""A client with no copy of the proto finds and calls the broker through
reflection; standard grpc.health.v1 Check and Watch answer."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from broker.app import BrokerApp
from broker.simulator import Simulator
from tests.helpers import paired_session


async def test_reflection_lists_services_and_calls_health(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, "962302")
    # Reflection's helper is synchronous: run it off the loop that serves the broker.
    response, services = await asyncio.to_thread(_call_health_by_reflection, broker.address)
    assert {"broker.v1.Broker", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    [session] = response.sessions
    assert session.session.session_id == "962302"
    assert session.counters.connects_total >= 1


def _call_health_by_reflection(address: str) -> tuple[Any, set[str]]:
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("broker.v1.Broker").methods_by_name["Health"]
        # Any: newer types-protobuf types Message() without field keywords.
        request_cls: Any = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/broker.v1.Broker/Health",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return call(request_cls(session_ids=["962302"]), timeout=5), services


async def test_standard_health_check_and_watch(broker: BrokerApp) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "broker.v1.Broker"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="broker.v1.Broker"), timeout=5)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
