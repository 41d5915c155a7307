"""docs/diagnostics.md tells the truth: every grpcurl command in it is performed.

The commands are parsed out of the doc's ```sh blocks and performed the way
grpcurl does it, through server reflection with no copy of the proto:
ProtoReflectionDescriptorDatabase finds the types, message_factory builds the
classes, json_format turns the doc's `-d` payloads into requests. The answer
is compared with the block after the command: the services and methods
listed, the signatures and fields described, the JSON fields (values only for
states, flags and reasons, since ids and times differ per run), the error code
and message. grpcurl itself is not needed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from broker.app import BrokerApp
from broker.simulator import Simulator
from tests.helpers import paired_session

DOC = Path(__file__).resolve().parents[2] / "docs" / "diagnostics.md"
DOC_TARGET = "127.0.0.1:50051"
CALL_TIMEOUT_S = 10.0
# JSON values compared as written in the doc; everything else only by key.
STABLE_KEYS = {
    "state", "status", "liveState", "fromState", "toState", "previousState", "reason", "code",
    "duplicate", "healthy", "snapshot", "hasCredentials", "sessionId", "tenant",
}
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_RPC = re.compile(r"rpc (\w+) \( (stream )?\.([\w.]+) \) returns \( (stream )?\.([\w.]+) \);")
_FIELD = re.compile(r"(repeated )?([\w.]+) (\w+) = (\d+);")
_SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in vars(FieldDescriptor).items()
    if name.startswith("TYPE_") and name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


@dataclass
class Example:
    argv: list[str]
    kind: str = ""
    expected: str = ""


@dataclass
class Command:
    target: str
    verb: str  # "list", "describe" or "call"
    symbol: str = ""
    data: str = "{}"
    headers: tuple[tuple[str, str | bytes], ...] = ()


def examples() -> list[Example]:
    """Each ```sh grpcurl command with the ```text/```json block right after it."""
    found: list[Example] = []
    for match in _BLOCK.finditer(DOC.read_text()):
        lang, body = match.group(1), match.group(2)
        if lang == "sh":
            text = body.replace("\\\n", " ")
            lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
            assert len(lines) == 1 and lines[0].startswith("grpcurl "), \
                f"one grpcurl command per sh block, got {body!r}"
            found.append(Example(shlex.split(lines[0])))
        elif lang in ("text", "json") and found and not found[-1].kind:
            found[-1].kind, found[-1].expected = lang, body
    return found


def parse(argv: list[str]) -> Command:
    """The grpcurl flags the doc uses; anything else must be taught here first."""
    assert argv[0] == "grpcurl"
    args = iter(argv[1:])
    positional: list[str] = []
    data = "{}"
    headers: list[tuple[str, str | bytes]] = []
    for arg in args:
        if arg == "-plaintext":
            continue
        if arg == "-d":
            data = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers.append((name.strip().lower(), value.strip()))
        elif arg == "-max-time":
            next(args)  # the stream is read for as many events as the doc shows
        else:
            assert not arg.startswith("-"), f"unsupported grpcurl flag {arg} in the doc"
            positional.append(arg)
    target, *rest = positional
    if rest[0] in ("list", "describe"):
        return Command(target, rest[0], rest[1] if len(rest) > 1 else "", data, tuple(headers))
    [method] = rest
    return Command(target, "call", method, data, tuple(headers))


def go_code(code: grpc.StatusCode) -> str:
    """grpcurl prints Go's code names: NOT_FOUND -> NotFound."""
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


class Reflector:
    """What grpcurl does with reflection, synchronously (run it in a thread)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def run(self, command: Command) -> tuple[str, Any]:
        if command.verb == "list":
            if not command.symbol:
                return "lines", sorted(self.database.get_services())
            service = self.pool.FindServiceByName(command.symbol)
            return "lines", sorted(m.full_name for m in service.methods)
        if command.verb == "describe":
            try:
                return "service", self.pool.FindServiceByName(command.symbol)
            except KeyError:
                return "message", self.pool.FindMessageTypeByName(command.symbol)
        return self.call(command)

    def call(self, command: Command, count: int = 1) -> tuple[str, Any]:
        service_name, method_name = command.symbol.split("/")
        method = self.pool.FindServiceByName(service_name).methods_by_name[method_name]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(command.data, request_cls())
        path = f"/{service_name}/{method_name}"
        kwargs: dict[str, Any] = {
            "request_serializer": request_cls.SerializeToString,
            "response_deserializer": response_cls.FromString,
        }
        try:
            if method.server_streaming:
                stream: Any = self.channel.unary_stream(path, **kwargs)(
                    request, timeout=CALL_TIMEOUT_S, metadata=command.headers)
                replies = [next(stream) for _ in range(count)]
                stream.cancel()
            else:
                replies = [self.channel.unary_unary(path, **kwargs)(
                    request, timeout=CALL_TIMEOUT_S, metadata=command.headers)]
        except grpc.RpcError as err:
            return "error", (err.code(), err.details())
        return "messages", [json_format.MessageToDict(r) for r in replies]


def json_objects(text: str) -> list[Any]:
    decoder, objects, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        obj, at = decoder.raw_decode(text, at)
        objects.append(obj)
        while at < len(text) and text[at].isspace():
            at += 1
    return objects


def check_json(expected: Any, actual: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}: the doc shows {key!r}, the broker sent {actual}"
            if key in STABLE_KEYS:
                assert actual[key] == value, f"{where}.{key}: doc {value!r}, broker {actual[key]!r}"
            check_json(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), \
            f"{where}: doc shows {len(expected)} items, broker sent {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            check_json(e, a, f"{where}[{i}]")


def _type_name(f: FieldDescriptor) -> str:
    if f.message_type is not None:
        return "." + f.message_type.full_name
    if f.enum_type is not None:
        return "." + f.enum_type.full_name
    return _SCALARS[f.type]


def check_describe(kind: str, symbol: str, found: Any, expected: str) -> None:
    header, *body = expected.strip().splitlines()
    assert header == f"{symbol} is a {kind}:", header
    if kind == "service":
        assert isinstance(found, ServiceDescriptor)
        rpcs = [_RPC.search(line) for line in body]
        shown = {m.group(1): m for m in rpcs if m}
        assert set(shown) == set(found.methods_by_name), "describe must show every method"
        for name, m in shown.items():
            method = found.methods_by_name[name]
            assert (m.group(3), m.group(5)) == (
                method.input_type.full_name, method.output_type.full_name), m.group(0)
            assert (bool(m.group(2)), bool(m.group(4))) == (
                method.client_streaming, method.server_streaming), m.group(0)
        return
    assert isinstance(found, Descriptor)
    fields = [_FIELD.search(line) for line in body]
    shown_fields = {m.group(3): m for m in fields if m}
    assert set(shown_fields) == set(found.fields_by_name), "describe must show every field"
    for name, m in shown_fields.items():
        f = found.fields_by_name[name]
        assert (bool(m.group(1)), m.group(2), int(m.group(4))) == (
            f.is_repeated, _type_name(f), f.number), m.group(0)


def check_example(reflector: Reflector, address: str, example: Example) -> None:
    command = parse(example.argv)
    assert command.target == DOC_TARGET, f"doc commands use {DOC_TARGET}"
    command.target = address
    assert example.kind, f"no answer block after {shlex.join(example.argv)}"
    if command.verb == "call" and example.kind == "json":
        expected = json_objects(example.expected)
        kind, answer = reflector.call(command, count=len(expected))
        assert kind == "messages", f"{command.symbol}: doc shows JSON, broker said {answer}"
        for i, (e, a) in enumerate(zip(expected, answer, strict=True)):
            check_json(e, a, f"{command.symbol}#{i}")
        return
    kind, answer = reflector.run(command)
    if command.verb == "list":
        assert answer == sorted(example.expected.split()), f"{shlex.join(example.argv)}"
    elif command.verb == "describe":
        check_describe(kind, command.symbol, answer, example.expected)
    else:
        shown = dict(re.findall(r"^\s*(Code|Message): (.*)$", example.expected, re.M))
        assert kind == "error", f"{command.symbol}: doc shows an error, broker answered {answer}"
        code, message = answer
        assert (go_code(code), message) == (shown["Code"], shown["Message"])


def check_all(address: str, found: list[Example]) -> None:
    with grpc.insecure_channel(address) as channel:
        reflector = Reflector(channel)
        for example in found:
            check_example(reflector, address, example)


async def test_every_grpcurl_command_in_the_doc(sim: Simulator, broker: BrokerApp) -> None:
    found = examples()
    verbs = {parse(e.argv).verb for e in found}
    methods = {parse(e.argv).symbol for e in found if parse(e.argv).verb == "call"}
    # The doc must keep covering what operators need.
    assert verbs == {"list", "describe", "call"}
    assert {"broker.v1.Broker/Send", "broker.v1.Broker/StreamStatus", "broker.v1.Broker/Health",
            "grpc.health.v1.Health/Check"} <= methods
    await paired_session(broker, sim, "962302")
    # Reflection's helper is synchronous: run it off the loop that serves the broker.
    await asyncio.to_thread(check_all, broker.address, found)
