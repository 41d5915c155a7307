"""Server roles of the harness, each run in its own process:

- ``sim``: the upstream simulator (docs/protocol.md) on a free port;
- ``echo``: raw grpc.aio unary echo of broker.v1.Broker/Send (the gRPC floor);
- ``fanout-floor``: StreamStatus from a plain grpc.aio server, each event sent to
  every stream on request (the fan-out floor).
- ``relay``: the minimal relay, gRPC in and websocket out to the simulator, one
  connection per session, no persistence, no lifecycle (the architecture floor).
- ``http-relay``: the seed's own design, the peer users run today: an aiohttp HTTP
  API that owns one websocket per login and answers ``POST /send`` after the
  upstream ack (its Node twin, Express + ``ws``, is ``node/http_relay.js``).

Each prints ``READY {json}`` on stdout once it serves, then runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from broker.simulator import Simulator, SimulatorConfig
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from scripts.bench.common import raise_nofile, upstream_login

Context = grpc.aio.ServicerContext[Any, Any]


def _ready(**info: Any) -> None:
    print("READY " + json.dumps(info), flush=True)


async def _until_term() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve(servicer: pb_grpc.BrokerServicer) -> None:
    """Serve broker.v1.Broker on a free loopback port until SIGTERM."""
    server = grpc.aio.server()
    pb_grpc.add_BrokerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _ready(address=f"127.0.0.1:{port}")
    await _until_term()
    await server.stop(1)


def _ts(at: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(at * 1e9))
    return ts


# -- simulator -----------------------------------------------------------------

async def run_sim(args: argparse.Namespace) -> None:
    sim = Simulator(SimulatorConfig(idle_timeout_s=args.idle_timeout,
                                    qr_interval_s=args.qr_interval, qr_max=5))
    await sim.start("127.0.0.1", 0)
    _ready(url=sim.url, control=sim.control_url)
    try:
        await _until_term()
    finally:
        await sim.stop()


# -- gRPC floor ------------------------------------------------------------------

class Echo(pb_grpc.BrokerServicer):
    """Answers Send at once, with a response of the broker's shape."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)

    async def Send(self, request: pb.SendRequest, context: Context) -> pb.SendResponse:
        now = _ts(time.time())
        return pb.SendResponse(message_id=f"m-{request.idempotency_key}", status=pb.ACKED,
                               sequence=next(self._seq), accepted_at=now, acked_at=now)


async def run_echo(args: argparse.Namespace) -> None:
    await _serve(Echo())  # type: ignore[abstract]


# -- fan-out floor -------------------------------------------------------------------

class FanoutFloor(pb_grpc.BrokerServicer):
    """StreamStatus from a plain grpc.aio server: a snapshot on subscribe, then each
    event RestartSession asks for, sent to every stream. No broker logic, the same
    messages: what 1,000 grpc.aio stream writes cost on this machine."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[pb.StatusEvent]] = set()
        self._seq = itertools.count(1)

    async def StreamStatus(
        self, request: pb.StreamStatusRequest, context: Context
    ) -> AsyncIterator[pb.StatusEvent]:
        queue: asyncio.Queue[pb.StatusEvent] = asyncio.Queue()
        self.queues.add(queue)
        try:
            sid = request.session_ids[0] if request.session_ids else ""
            yield pb.StatusEvent(session_id=sid, state=pb.OPEN, snapshot=True,
                                 at=_ts(time.time()))
            while True:
                yield await queue.get()
        finally:
            self.queues.discard(queue)

    async def RestartSession(self, request: pb.SessionRef, context: Context) -> pb.Session:
        """One event now; with `<session>@<offset>,<offset>,...` a burst of events at
        those offsets (seconds), timed by this server, not by the next call's arrival."""
        session_id, _, schedule = request.session_id.partition("@")
        offsets = [float(o) for o in schedule.split(",")] if schedule else [0.0]
        loop = asyncio.get_running_loop()
        for offset in offsets:
            loop.call_later(offset, self._publish, session_id)
        return pb.Session(session_id=session_id, state=pb.OPEN)

    def _publish(self, session_id: str) -> None:
        seq = next(self._seq)
        event = pb.StatusEvent(  # the fields a broker event carries, alike in size
            event_id=f"{int(time.time() * 1000)}-{seq}", session_id=session_id,
            sequence=seq, state=pb.OPEN, previous_state=pb.CONNECTING, reason="connected",
            at=_ts(time.time()))
        for queue in self.queues:
            queue.put_nowait(event)


async def run_fanout_floor(args: argparse.Namespace) -> None:
    await _serve(FanoutFloor())  # type: ignore[abstract]


# -- architecture floor ------------------------------------------------------------

class _Upstream:
    """One websocket per session: pair once through the simulator, then relay sends."""

    def __init__(self, url: str, control: str, login: str) -> None:
        self.url, self.control, self.login = url, control, login
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.keepalive: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.ws = await upstream_login(self.url, self.control, self.login)
        self.reader = asyncio.create_task(self._read())
        self.keepalive = asyncio.create_task(self._keepalive())

    async def _keepalive(self) -> None:
        """Application pings, as the broker's keep-alive: the upstream closes idle links."""
        for n in itertools.count(1):
            await asyncio.sleep(10)
            await self.ws.send(json.dumps({"type": "ping", "id": n}))

    async def _read(self) -> None:
        async for raw in self.ws:
            frame = json.loads(raw)
            if frame.get("type") == "ack":
                fut = self.waiters.pop(frame["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(time.time())

    async def send(self, to: str, body: str) -> tuple[str, float]:
        mid = f"m-{uuid.uuid4().hex}"
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[mid] = fut
        await self.ws.send(json.dumps({"type": "send", "id": mid, "to": to, "body": body}))
        return mid, await fut


class _Links:
    """One upstream websocket per login, opened on first use (concurrent first
    uses share the opening)."""

    def __init__(self, url: str, control: str) -> None:
        self.url, self.control = url, control
        self.links: dict[str, _Upstream] = {}
        self.opening: dict[str, asyncio.Task[_Upstream]] = {}

    async def get(self, session_id: str) -> _Upstream:
        link = self.links.get(session_id)
        if link is not None:
            return link
        task = self.opening.get(session_id)
        if task is None:
            task = self.opening[session_id] = asyncio.create_task(self._open(session_id))
        return await task

    async def _open(self, session_id: str) -> _Upstream:
        link = _Upstream(self.url, self.control, session_id)
        await link.open()
        self.links[session_id] = link
        return link

    async def close(self) -> None:
        for link in self.links.values():
            with contextlib.suppress(Exception):
                await link.ws.close()


class Relay(pb_grpc.BrokerServicer):
    def __init__(self, url: str, control: str) -> None:
        self.links = _Links(url, control)
        self._seq = itertools.count(1)

    async def Send(self, request: pb.SendRequest, context: Context) -> pb.SendResponse:
        accepted = time.time()
        link = await self.links.get(request.session_id)
        mid, acked = await link.send(request.to, request.body)
        return pb.SendResponse(message_id=mid, status=pb.ACKED, sequence=next(self._seq),
                               accepted_at=_ts(accepted), acked_at=_ts(acked))


async def run_relay(args: argparse.Namespace) -> None:
    relay = Relay(args.upstream_url, args.control_url)  # type: ignore[abstract]
    await _serve(relay)
    await relay.links.close()


# -- the peer users run today: an HTTP relay (aiohttp) -------------------------------

async def run_http_relay(args: argparse.Namespace) -> None:
    """``POST /send`` with JSON ``{session_id, to, body}``: relayed on the login's one
    websocket, answered ``{message_id, status, acked_at}`` once the upstream acks."""
    from aiohttp import web

    links = _Links(args.upstream_url, args.control_url)

    async def send(request: web.Request) -> web.Response:
        data = await request.json()
        link = await links.get(data["session_id"])
        mid, acked = await link.send(data["to"], data["body"])
        return web.json_response({"message_id": mid, "status": "ACKED", "acked_at": acked})

    app = web.Application()
    app.router.add_post("/send", send)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    _ready(url=f"http://127.0.0.1:{port}")
    await _until_term()
    await links.close()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    raise_nofile()
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.servers")
    sub = parser.add_subparsers(dest="role", required=True)
    sim = sub.add_parser("sim")
    sim.add_argument("--idle-timeout", type=float, default=20.0)
    sim.add_argument("--qr-interval", type=float, default=60.0)
    sub.add_parser("echo")
    sub.add_parser("fanout-floor")
    relay = sub.add_parser("relay")
    relay.add_argument("--upstream-url", required=True)
    relay.add_argument("--control-url", required=True)
    http = sub.add_parser("http-relay")
    http.add_argument("--upstream-url", required=True)
    http.add_argument("--control-url", required=True)
    args = parser.parse_args(argv)
    runner = {"sim": run_sim, "echo": run_echo, "relay": run_relay,
              "http-relay": run_http_relay, "fanout-floor": run_fanout_floor}[args.role]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main(sys.argv[1:])
