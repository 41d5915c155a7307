"""A hostile upstream: garbage and off-spec frames at the provider and the session actor.

Unit level, `broker.upstream.protocol.decode` only ever raises ProtocolError and
only returns frames that are safe to act on. End to end, a small proxy stands
in for the upstream: login "evil-N" gets a Hypothesis-generated script of
hostile frames and a hostile ending, every other login is relayed to the real
simulator. Each evil session must end up reconnecting (or, only when the
upstream closed with 401/403/500/440, in the state that code means), never
stuck and never crashed; its status stays readable over gRPC; the broker
logs no errors; and a healthy session on the same broker keeps sending.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from broker.app import BrokerApp
from broker.config import Settings
from broker.content import decode as decode_content
from broker.content import keep_inbound
from broker.lifecycle.policy import LifecyclePolicy
from broker.lifecycle.states import State
from broker.simulator import Simulator, SimulatorConfig
from broker.upstream import protocol as p
from broker_client.v1 import broker_pb2 as pb
from tests.helpers import FAST_POLICY, paired_session
from tests.hostile.harness import (
    NEVER,
    ErrorLog,
    LoopThread,
    Outcome,
    call_stream,
    call_unary,
)

Code = grpc.StatusCode
MAX_INT32 = 2**31 - 1

# -- unit level: decode -------------------------------------------------------

TYPES = ["hello", "ready", "qr", "paired", "error", "send", "ack", "receipt", "ping", "pong",
         "message", "inbound_ack", "logout", "presence"]
FIELDS = ["login", "credentials", "connection_id", "code", "index", "expires_in_ms", "reason",
          "retry_after_ms", "id", "to", "body", "duplicate", "status", "from", "ts", "content",
          "presence"]
ABSURD_INTS = st.sampled_from([-1, -(2**31), 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**30,
                               10**400, 0, 1, MAX_INT32])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), ABSURD_INTS,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def _nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"type": "paired", "credentials": ' + '{"a": ' * depth + "1" + "}" * depth + "}"


FRAME_OBJECTS = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(TYPES), JSON)},
    optional={name: st.one_of(JSON, ABSURD_INTS) for name in FIELDS},
)
FRAME_TEXTS = st.one_of(
    st.text(max_size=200),
    st.builds(json.dumps, JSON),
    st.builds(json.dumps, FRAME_OBJECTS),
    st.builds(_nested, st.sampled_from([10, 500, 990, 5000, 100_000]),
              st.sampled_from(["list", "dict"])),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", '{"type": "message", "id": "i", '
                     '"from": "f", "body": "b", "ts": 1e400}', '{"type": "pong", "id": 1e3}',
                     '{"type": "qr", "code": "c", "index": 1.5, "expires_in_ms": 10}',
                     '{"type": "hello", "login": "x", "credentials": []}', "\ufeff{}", "{}"]),
)

UNIT = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Send frames whose content is near a valid one (docs/protocol.md "Content"): each
# part valid, or any JSON instead.
_B64 = st.one_of(st.builds(lambda b: base64.b64encode(b).decode(), st.binary(max_size=40)),
                 st.sampled_from(["", "A", "AB=", "!!!!", "QUJD\n", "QUJD===", "\u00e9"]))
_MEDIA = st.fixed_dictionaries({}, optional={
    "kind": st.one_of(st.sampled_from(["image", "video", "audio", "voice_note", "document",
                                       "sticker", "IMAGE", ""]), JSON),
    "data": st.one_of(_B64, JSON), "mime_type": st.one_of(st.text(max_size=20), JSON),
    "caption": st.one_of(st.text(max_size=20), JSON),
    "file_name": st.one_of(st.text(max_size=20), JSON)})
_LOCATION = st.fixed_dictionaries({}, optional={
    "latitude": st.one_of(st.floats(allow_nan=True, allow_infinity=True), ABSURD_INTS, JSON),
    "longitude": st.one_of(st.floats(allow_nan=True, allow_infinity=True), ABSURD_INTS, JSON),
    "name": st.one_of(st.text(max_size=10), JSON), "address": JSON})
_REACTION = st.fixed_dictionaries({}, optional={
    "message_id": st.one_of(st.text(max_size=10), JSON),
    "emoji": st.one_of(st.text(max_size=4), JSON),
    "from_me": st.one_of(st.booleans(), JSON)})
CONTENTS = st.one_of(JSON, st.fixed_dictionaries({}, optional={
    "text": st.one_of(st.text(max_size=20), JSON), "media": st.one_of(_MEDIA, JSON),
    "location": st.one_of(_LOCATION, JSON), "reaction": st.one_of(_REACTION, JSON),
    "reply_to": st.one_of(st.text(max_size=20), JSON),
    "mentions": st.one_of(st.lists(st.text(max_size=10), max_size=4), JSON)}))
SEND_FRAMES = st.builds(
    lambda content, presence: json.dumps({"type": "send", "id": "m-1", "to": "+1", "body": "",
                                          "content": content}) if presence is None else
    json.dumps({"type": "presence", "to": "+1", "presence": presence}),
    CONTENTS, st.one_of(st.none(), st.none(), JSON,
                        st.sampled_from(["composing", "paused", "available", "recording"])))


@UNIT
@given(raw=SEND_FRAMES)
def test_send_and_presence_frames_raise_only_protocol_error(raw: str) -> None:
    """What the simulator reads of a client: content and presence of every shape."""
    try:
        frame = p.decode(raw, max_bytes=p.MAX_SEND_FRAME_BYTES)
    except p.ProtocolError:
        return
    assert p.encode(p.decode(p.encode(frame))) == p.encode(frame)
    if isinstance(frame, p.Send) and frame.content is not None:
        media = frame.content.media
        assert media is None or 0 < len(media.data) <= p.MAX_WIRE_MEDIA_BYTES


_INBOUND_MEDIA = st.one_of(_MEDIA, st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["image", "document", ""]), "data": st.one_of(_B64, JSON),
    "mime_type": st.text(max_size=10), "size": st.one_of(ABSURD_INTS, JSON, st.floats()),
    "error": st.one_of(st.text(max_size=20), JSON)}))
MESSAGE_FRAMES = st.builds(
    lambda content: json.dumps({"type": "message", "id": "i-1", "from": "+1", "body": "",
                                "ts": 1.0, "content": content}),
    st.one_of(CONTENTS, st.fixed_dictionaries({"media": _INBOUND_MEDIA}, optional={
        "reply_to": st.one_of(st.text(max_size=20), JSON)})))


@UNIT
@given(raw=MESSAGE_FRAMES)
def test_inbound_content_raises_only_protocol_error_and_keeps_safely(raw: str) -> None:
    """What the broker reads of an upstream: inbound content of every shape; what
    decodes is kept (`keep_inbound`) without error and round-trips."""
    try:
        frame = p.decode(raw, max_bytes=p.MAX_SEND_FRAME_BYTES)
    except p.ProtocolError:
        return
    assert isinstance(frame, p.Message)
    assert p.encode(p.decode(p.encode(frame), max_bytes=p.MAX_SEND_FRAME_BYTES)) == \
        p.encode(frame)
    payload, media = keep_inbound(frame.content, max_media_bytes=16)
    if frame.content is not None and frame.content.media is not None:
        assert payload is not None
        kept = decode_content(payload).media
        assert kept is not None and kept.data == b"" and kept.size >= 0
        assert (media is None) == bool(kept.download_error)
        assert media is None or len(media) <= 16


def _check_decoded(frame: p.Frame) -> None:
    """What a frame that decodes must guarantee to the code acting on it."""
    match frame:
        case p.Qr(index=index, expires_in_ms=expires):
            assert 0 <= index <= MAX_INT32  # QrCode.index is an int32
            assert 0 <= expires <= MAX_INT32
        case p.Error(retry_after_ms=retry):
            assert retry is None or 0 <= retry <= MAX_INT32
        case p.Message(ts=ts):
            assert math.isfinite(ts)
        case p.Ping(id=pid) | p.Pong(id=pid):
            assert -(2**63) <= pid < 2**63
        case _:
            pass
    # What was accepted survives a round trip unchanged (the provider re-encodes
    # credentials into its next hello).
    assert p.encode(p.decode(p.encode(frame))) == p.encode(frame)


def _decode_or_protocol_error(raw: str | bytes) -> None:
    try:
        frame = p.decode(raw)
    except p.ProtocolError:
        return
    _check_decoded(frame)


@UNIT
@given(raw=FRAME_TEXTS)
def test_decode_text_raises_only_protocol_error(raw: str) -> None:
    _decode_or_protocol_error(raw)


@UNIT
@given(raw=st.one_of(st.binary(max_size=300), st.builds(str.encode, FRAME_TEXTS)))
def test_decode_bytes_raises_only_protocol_error(raw: bytes) -> None:
    _decode_or_protocol_error(raw)


@pytest.mark.parametrize("depth", [10, 31, 33, 100, 400, 500, 990, 5000, 100_000])
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_decode_deep_nesting(depth: int, kind: str) -> None:
    """Deep enough to break json, or only the re-encoding of credentials later."""
    _decode_or_protocol_error(_nested(depth, kind))


def test_decode_rejects_frames_over_the_limit() -> None:
    big = json.dumps({"type": "message", "id": "i", "from": "f", "body": "x" * p.MAX_FRAME_BYTES})
    for raw in (big, big.encode()):
        with pytest.raises(p.ProtocolError):
            p.decode(raw)


# -- end to end: a hostile upstream ---------------------------------------------


@dataclass(frozen=True)
class Text:
    data: str


@dataclass(frozen=True)
class Binary:
    data: bytes


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True)
class Abort:
    """Drop the TCP connection without a close frame."""


@dataclass(frozen=True)
class Silent:
    """Stop talking and keep the connection open."""


Step = Text | Binary
Ending = Close | Abort | Silent


@dataclass(frozen=True)
class Script:
    steps: list[Step]
    ending: Ending


#: Close codes after which the session legitimately waits for a person.
TERMINAL_BY_CLOSE = {4401: State.LOGGED_OUT, 4403: State.FAILED, 4500: State.FAILED,
                     4440: State.CONFLICT}


class HostileUpstream:
    """Plays a script to each scripted login's first connection; relays the rest.

    Later connections of a scripted login get silence: the point is only to
    see the session come back, whatever happened to it.
    """

    def __init__(self, real_url: str) -> None:
        self.real_url = real_url
        self.scripts: dict[str, Script] = {}
        self.attempts: Counter[str] = Counter()
        self._server: Server | None = None

    async def start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", 0, ping_interval=None,
                                   close_timeout=1, max_size=None)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}{p.CONNECT_PATH}"

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            first = await asyncio.wait_for(ws.recv(), 5.0)
        except (TimeoutError, ConnectionClosed):
            return
        login = _login_of(first)
        script = self.scripts.get(login)
        if script is None:
            await self._relay(ws, first)
            return
        self.attempts[login] += 1
        if self.attempts[login] > 1:
            await ws.wait_closed()
            return
        with contextlib.suppress(ConnectionClosed):
            for step in script.steps:
                await ws.send(step.data)
            match script.ending:
                case Close(code=code, reason=reason):
                    await ws.close(code, reason)
                case Abort():
                    ws.transport.abort()
                case Silent():
                    await ws.wait_closed()

    async def _relay(self, ws: ServerConnection, first: str | bytes) -> None:
        try:
            upstream = await connect(self.real_url, ping_interval=None, close_timeout=1,
                                     max_size=p.MAX_FRAME_BYTES, open_timeout=5)
        except (OSError, TimeoutError):
            ws.transport.abort()
            return
        async with upstream:
            with contextlib.suppress(ConnectionClosed):
                await upstream.send(first)
            pumps = [asyncio.ensure_future(_pump(ws, upstream)),
                     asyncio.ensure_future(_pump(upstream, ws))]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for src, dst in ((upstream, ws), (ws, upstream)):
                code = src.close_code
                if code is not None and dst.close_code is None:
                    if code in (1005, 1006):
                        dst.transport.abort()
                    else:
                        with contextlib.suppress(ConnectionClosed):
                            await dst.close(code, src.close_reason or "")


async def _pump(src: ServerConnection | ClientConnection,
                dst: ServerConnection | ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in src:
            await dst.send(message)


def _login_of(raw: str | bytes) -> str:
    try:
        hello = json.loads(raw)
    except ValueError:
        return ""
    login = hello.get("login") if isinstance(hello, dict) else None
    return login if isinstance(login, str) else ""


def _frame(**fields: Any) -> st.SearchStrategy[str]:
    return st.fixed_dictionaries(fields).map(json.dumps)


_IDS = st.one_of(st.text(max_size=10), st.sampled_from(["m-unknown", "", "i-1"]))
_ANY = st.one_of(JSON, ABSURD_INTS)
HOSTILE_TEXT = st.one_of(
    # off-spec text: not JSON, not an object, unknown types, wrong field types
    st.text(max_size=50), st.builds(json.dumps, JSON), st.builds(json.dumps, FRAME_OBJECTS),
    # well-formed frames at the wrong moment or naming things that do not exist
    _frame(type=st.just("ack"), id=_IDS, duplicate=st.booleans()),
    _frame(type=st.just("receipt"), id=_IDS, status=st.text(max_size=10)),
    _frame(type=st.just("pong"), id=st.one_of(st.integers(-5, 10**6), ABSURD_INTS)),
    _frame(type=st.just("ready"), login=st.text(max_size=10), connection_id=st.text(max_size=10)),
    _frame(type=st.just("paired"), credentials=st.one_of(
        JSON, st.dictionaries(st.text(max_size=5), JSON, max_size=3))),
    _frame(type=st.just("qr"), code=st.text(max_size=20),
           index=st.one_of(st.integers(1, 1000), ABSURD_INTS),
           expires_in_ms=st.one_of(st.integers(0, 1500), ABSURD_INTS)),
    _frame(type=st.just("error"), code=st.one_of(st.sampled_from([503, 429]), _ANY),
           reason=st.text(max_size=10), retry_after_ms=st.one_of(st.integers(0, 200), _ANY)),
    _frame(type=st.just("message"), id=_IDS, **{"from": st.text(max_size=10)},
           body=st.text(max_size=50), ts=st.one_of(st.floats(), ABSURD_INTS)),
    _frame(type=st.sampled_from(["hello", "send", "ping", "logout", "inbound_ack"]), id=_ANY,
           login=_ANY),
    # deep nesting and frames over the size limit
    st.builds(_nested, st.sampled_from([100, 500, 990, 5000, 50_000]),
              st.sampled_from(["list", "dict"])),
    st.just("x" * (p.MAX_FRAME_BYTES + 1)),
    st.just(json.dumps({"type": "message", "id": "big", "from": "f",
                        "body": "y" * (p.MAX_FRAME_BYTES - 100)})),
)
STEPS = st.lists(
    st.one_of(HOSTILE_TEXT.map(Text), st.binary(max_size=100).map(Binary),
              st.builds(str.encode, HOSTILE_TEXT).map(Binary)),
    max_size=8,
)
CLOSE_REASONS = st.text(max_size=30)
ENDINGS = st.one_of(
    st.builds(Close, st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                      3000, 3999, 4000, 4001, 4399, 4400, 4408, 4428, 4429,
                                      4503, 4515, 4999, *TERMINAL_BY_CLOSE]), CLOSE_REASONS),
    st.builds(Close, st.integers(3000, 4999), CLOSE_REASONS),
    st.just(Abort()), st.just(Silent()),
)
_READY = Text(json.dumps({"type": "ready", "login": "evil", "connection_id": "c-1"}))
_QR = Text(json.dumps({"type": "qr", "code": "2@abc", "index": 1, "expires_in_ms": 300}))
_PAIRED = Text(json.dumps({"type": "paired", "credentials": {"token": "t"}}))
#: A plausible start first (open, pairing, paired), so the garbage also hits the
#: states past the handshake.
PREFIXES = st.sampled_from([[], [_READY], [_QR], [_QR, _PAIRED], [_QR, _QR]])
SCRIPTS = st.builds(lambda prefix, steps, ending: Script(prefix + steps, ending),
                    PREFIXES, STEPS, ENDINGS)

HOSTILE_POLICY: LifecyclePolicy = replace(FAST_POLICY, keepalive_interval_s=0.2,
                                          keepalive_timeout_s=0.5)
"""Keep-alive on: a hostile upstream that says `ready` and then goes quiet is caught."""
GOOD = "good-behind-proxy"


@dataclass(repr=False)
class Env:
    loop: LoopThread
    sim: Simulator
    upstream: HostileUpstream
    app: BrokerApp
    channel: grpc.aio.Channel
    errors: ErrorLog
    names: Iterator[int]

    def __repr__(self) -> str:
        return "Env()"

    def state(self, session_id: str) -> State | None:
        assert self.app.manager is not None
        actor = self.app.manager.actors.get(session_id)
        return actor.state if actor else None


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    loop = LoopThread()
    holder: dict[str, Any] = {}

    async def start() -> Env:
        sim = holder["sim"] = Simulator(SimulatorConfig(idle_timeout_s=5.0, qr_interval_s=5.0,
                                                        receipt_delay_s=0.0))
        await sim.start()
        upstream = holder["upstream"] = HostileUpstream(sim.url)
        await upstream.start()
        app = holder["app"] = BrokerApp(Settings(
            listen="127.0.0.1:0", upstream_url=upstream.url, lifecycle=HOSTILE_POLICY,
            ack_timeout_s=1.0, connect_timeout_s=1.0))
        await app.start()
        await paired_session(app, sim, GOOD)
        channel = grpc.aio.insecure_channel(app.address)
        return Env(loop, sim, upstream, app, channel, ErrorLog(), itertools.count(1))

    async def stop() -> None:
        if "env" in holder:
            await holder["env"].channel.close()
        for name in ("app", "upstream", "sim"):
            if name in holder:
                await holder[name].stop()

    try:
        environment = holder["env"] = loop.run(start())
        with environment.errors:
            yield environment
    finally:
        loop.run(stop())
        loop.close()


def _assert_good_session_works(env: Env) -> None:
    send = pb.SendRequest(session_id=GOOD, to="+15550100", body="still here",
                          idempotency_key=f"k-{uuid.uuid4().hex}")
    out = env.loop.run(call_unary(env.channel, "/broker.v1.Broker/Send",
                                  send.SerializeToString(), 15.0))
    assert out.code == Code.OK, f"the healthy session cannot send: {out.describe()}"
    assert pb.SendResponse.FromString(out.responses[0]).status == pb.ACKED
    assert env.state(GOOD) == State.OPEN


async def _wait_until_recovering(env: Env, login: str, script: Script,
                                 timeout: float = 10.0) -> State | None:
    """Until the session is back at the upstream with a new connection (or honours a
    long retry-after, or legitimately waits for a person); returns the state it is in,
    or fails if it got stuck."""
    assert env.app.manager is not None
    allowed_terminal = (TERMINAL_BY_CLOSE.get(script.ending.code)
                        if isinstance(script.ending, Close) else None)
    deadline = time.monotonic() + timeout
    while True:
        state = env.state(login)
        if env.upstream.attempts[login] >= 2:
            return state
        if state == State.RECONNECTING:
            last = await env.app.manager.store.last_event(login)
            if last is not None and last.retry_in_s is not None and last.retry_in_s >= 2.0:
                return state  # an upstream's retry-after (bounded by decode) is honoured
        if state is not None and state == allowed_terminal:
            return state
        if state in (State.LOGGED_OUT, State.FAILED, State.CONFLICT, State.STOPPED):
            raise AssertionError(f"{login} went {state} after {script.ending}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{login} is stuck in {state} (attempts "
                                 f"{env.upstream.attempts[login]})")
        await asyncio.sleep(0.01)


async def _read_status(env: Env, login: str) -> list[tuple[str, Outcome]]:
    """Everything an operator would look at, for the hostile session."""
    service = "/broker.v1.Broker/"
    ref = pb.SessionRef(session_id=login).SerializeToString()
    return [
        ("GetSession", await call_unary(env.channel, service + "GetSession", ref, 10.0)),
        ("GetQr", await call_unary(env.channel, service + "GetQr", ref, 10.0)),
        ("Health", await call_unary(env.channel, service + "Health", pb.HealthRequest(
            session_ids=[login]).SerializeToString(), 10.0)),
        ("StreamStatus", await call_stream(env.channel, service + "StreamStatus",
                                           pb.StreamStatusRequest(session_ids=[login])
                                           .SerializeToString(), 10.0)),
    ]


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(script=SCRIPTS)
@example(script=Script([_QR, Text(_nested(500, "dict"))], Close(4515, "restart required")))
@example(script=Script([Text('{"type": "ack", "id": "m-unknown"}')], Silent()))
@example(script=Script([_QR], Silent()))
@example(script=Script([Text(json.dumps({"type": "error", "code": 503, "reason": "x",
                                         "retry_after_ms": 10**400}))], Close(4503, "")))
def test_hostile_upstream_never_sticks_or_crashes_a_session(env: Env, script: Script) -> None:
    login = f"evil-{next(env.names)}"
    env.upstream.scripts[login] = script

    async def run() -> tuple[State | None, list[tuple[str, Outcome]]]:
        assert env.app.manager is not None
        await env.app.manager.create(login)
        try:
            state = await _wait_until_recovering(env, login, script)
            return state, await _read_status(env, login)
        finally:
            await env.app.manager.delete(login)

    state, reads = env.loop.run(run(), timeout=60.0)
    event(f"ending: {type(script.ending).__name__}")
    event(f"recovered via: {state.value if state else None}")
    for what, out in reads:
        assert out.code not in NEVER, f"{what} after {state}: {out.describe()}"
        if what != "GetQr":  # FAILED_PRECONDITION when not pairing
            assert out.code == Code.OK, f"{what} after {state}: {out.describe()}"
    assert env.errors.take() == [], "the broker logged errors"
    assert env.loop.loop_errors == [], "unhandled exceptions on the broker's loop"
    _assert_good_session_works(env)


def test_healthy_session_survived_the_hostile_upstream(env: Env) -> None:
    """Runs after the storm above (same module broker): the relayed session still works."""
    _assert_good_session_works(env)
    assert env.errors.take() == []
