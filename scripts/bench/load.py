"""Client roles of the harness, each run in its own process; each prints one
``RESULT {json}`` line and exits. Every loop is bounded in count and in time.

- ``send``: closed-loop unary Send at a fixed concurrency (broker, relay and echo alike);
- ``stream``: the same closed loop on one SendStream call (``concurrency`` items in flight);
- ``batch``: SendBatch calls of ``--batch`` items, ``concurrency / batch`` calls in flight;
- ``client``: ``BrokerClient.send()`` from ``concurrency`` callers (``--no-coalesce``: unary);
- ``http``: the same closed loop against an HTTP relay peer (``POST /send``);
- ``ws``: the upstream floor, send-and-ack over one websocket straight to the simulator;
- ``fanout``: N StreamStatus subscribers; latency from each event's `at` to its arrival;
- ``reliable``: Sends retried with the same key until acked, for the drop schedule;
- ``ideal``: the drop schedule's reference, no broker: a bare simulator client that
  reconnects the instant it is dropped and resends what is unacked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from scripts.bench.common import (
    pair_upstream,
    raise_nofile,
    stat_cpu_seconds,
    summary_ms,
    upstream_login,
)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _result(**data: Any) -> None:
    print("RESULT " + json.dumps(data), flush=True)


#: Processes whose CPU the window measures (`--cpu-of NAME=PID`; "load" is this one).
_CPU_OF: dict[str, int] = {}


def _cpu_seconds(pid: int) -> float | None:
    try:
        return stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    except OSError:
        return None  # the process ended


class _CpuSampler(threading.Thread):
    """CPU seconds of each process over exactly the measured window: a thread, so a
    busy event loop cannot delay the readings."""

    def __init__(self, pids: dict[str, int], begin: float, end: float) -> None:
        super().__init__(daemon=True)
        self.pids, self.begin, self.end = pids, begin, end
        self.used: dict[str, float] = {}

    def run(self) -> None:
        time.sleep(max(0.0, self.begin - time.perf_counter()))
        before = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        time.sleep(max(0.0, self.end - time.perf_counter()))
        for name, pid in self.pids.items():
            start, stop = before[name], _cpu_seconds(pid)
            if start is not None and stop is not None:
                self.used[name] = stop - start


class Window:
    """Counts what completes inside [start + warmup, start + warmup + duration]."""

    def __init__(self, warmup: float, duration: float) -> None:
        self.t0 = time.perf_counter()
        self.begin = self.t0 + warmup
        self.end = self.begin + duration
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self._cpu: _CpuSampler | None = None
        if _CPU_OF:
            self._cpu = _CpuSampler(_CPU_OF | {"load": os.getpid()}, self.begin, self.end)
            self._cpu.start()

    def record(self, started: float, finished: float) -> None:
        if started >= self.begin and finished <= self.end:
            self.latencies.append(finished - started)

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def report(self, duration: float, **extra: Any) -> dict[str, Any]:
        done = len(self.latencies)
        out = {"throughput_rps": round(done / duration, 1), **summary_ms(self.latencies),
               "errors": self.errors, **extra}
        if self._cpu is not None:
            self._cpu.join(timeout=max(0.0, self.end - time.perf_counter()) + 5)
            if done and self._cpu.used:
                # per request completed in the window (the processes may also have
                # worked on requests that straddle its edges: an approximation)
                out["cpu_us_per_request"] = {name: round(used / done * 1e6, 1)
                                             for name, used in self._cpu.used.items()}
        return out


# -- send ----------------------------------------------------------------------

async def run_send(args: argparse.Namespace) -> None:
    window = Window(args.warmup, args.duration)
    hard_stop = window.end + 0.001
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pb_grpc.BrokerStub(channel)
        budget = [args.max_requests]

        async def worker(w: int) -> None:
            n = 0
            while budget[0] > 0 and time.perf_counter() < hard_stop:
                budget[0] -= 1
                n += 1
                request = pb.SendRequest(session_id=_session(args, w), to="+15550100",
                                         body=f"{args.prefix} {w} {n}",
                                         idempotency_key=f"{args.prefix}-{w}-{n}")
                started = time.perf_counter()
                try:
                    response = await stub.Send(request, timeout=args.timeout)
                except grpc.aio.AioRpcError as exc:
                    window.error(exc.code().name)
                    continue
                if response.status != pb.ACKED:
                    window.error("NOT_ACKED")
                    continue
                if response.duplicate:  # a key used before: a cache hit, not a send
                    window.error("DUPLICATE")
                    continue
                window.record(started, time.perf_counter())

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    _result(**window.report(args.duration, concurrency=args.concurrency))


# -- stream, batch, client (the high-throughput Send paths) ----------------------------

def _item(args: argparse.Namespace, ref: int, w: int, n: int) -> pb.SendItem:
    return pb.SendItem(ref=ref, request=pb.SendRequest(
        session_id=_session(args, w), to="+15550100", body=f"{args.prefix} {w} {n}",
        idempotency_key=f"{args.prefix}-{w}-{n}"), timeout_ms=int(args.timeout * 1000))


def _session(args: argparse.Namespace, w: int) -> str:
    """Worker w's session: `--sessions N` spreads workers over N sessions `<session>-<i>`."""
    return args.session if args.sessions <= 1 else f"{args.session}-{w % args.sessions}"


async def run_stream(args: argparse.Namespace) -> None:
    """`concurrency` workers, each with one item in flight on one shared SendStream."""
    window = Window(args.warmup, args.duration)
    hard_stop = window.end + 0.001
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        outgoing: asyncio.Queue[pb.SendItem | None] = asyncio.Queue()
        waiting: dict[int, asyncio.Future[pb.SendResult]] = {}

        async def requests() -> Any:
            """What is queued by the time the stream can write, in one request."""
            while (it := await outgoing.get()) is not None:
                items = [it]
                while not outgoing.empty() and (more := outgoing.get_nowait()) is not None:
                    items.append(more)
                yield pb.SendBatchRequest(items=items)

        call = pb_grpc.BrokerStub(channel).SendStream(requests())

        async def read() -> None:
            async for response in call:
                for result in response.results:
                    fut = waiting.pop(result.ref, None)
                    if fut is not None and not fut.done():
                        fut.set_result(result)

        reader = asyncio.create_task(read())
        refs = itertools.count(1)
        budget = [args.max_requests]

        async def worker(w: int) -> None:
            n = 0
            while budget[0] > 0 and time.perf_counter() < hard_stop:
                budget[0] -= 1
                n += 1
                ref = next(refs)
                fut: asyncio.Future[pb.SendResult] = asyncio.get_running_loop().create_future()
                waiting[ref] = fut
                started = time.perf_counter()
                outgoing.put_nowait(_item(args, ref, w, n))
                try:
                    async with asyncio.timeout(args.timeout):  # no task per wait
                        result = await fut
                except TimeoutError:
                    window.error("TIMEOUT")
                    continue
                if result.HasField("error"):
                    window.error(pb.ErrorReason.Reason.Name(result.error.reason))
                    continue
                if result.response.duplicate:
                    window.error("DUPLICATE")
                    continue
                window.record(started, time.perf_counter())

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        outgoing.put_nowait(None)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await asyncio.wait_for(reader, 10)
    _result(**window.report(args.duration, concurrency=args.concurrency))


async def run_batch(args: argparse.Namespace) -> None:
    """Closed-loop SendBatch calls of `--batch` items; every item's latency is its call's."""
    window = Window(args.warmup, args.duration)
    hard_stop = window.end + 0.001
    calls = max(1, args.concurrency // args.batch)
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pb_grpc.BrokerStub(channel)
        budget = [args.max_requests]

        async def worker(w: int) -> None:
            n = 0
            while budget[0] > 0 and time.perf_counter() < hard_stop:
                budget[0] -= args.batch
                items = []
                for i in range(args.batch):
                    n += 1
                    items.append(_item(args, i, w * args.batch + i, n))
                started = time.perf_counter()
                try:
                    response = await stub.SendBatch(pb.SendBatchRequest(items=items),
                                                    timeout=args.timeout)
                except grpc.aio.AioRpcError as exc:
                    window.error(exc.code().name)
                    continue
                finished = time.perf_counter()
                for result in response.results:
                    if result.HasField("error"):
                        window.error(pb.ErrorReason.Reason.Name(result.error.reason))
                    elif result.response.duplicate:
                        window.error("DUPLICATE")
                    else:
                        window.record(started, finished)

        await asyncio.gather(*(worker(w) for w in range(calls)))
    _result(**window.report(args.duration, concurrency=calls * args.batch))


async def run_client(args: argparse.Namespace) -> None:
    """The project's own client: `concurrency` callers of BrokerClient.send()."""
    from broker_client import BrokerClient, BrokerError

    window = Window(args.warmup, args.duration)
    hard_stop = window.end + 0.001
    async with BrokerClient(args.target, timeout=args.timeout,
                            coalesce=not args.no_coalesce) as client:
        await client.list_sessions()  # connected before the clock starts
        budget = [args.max_requests]

        async def worker(w: int) -> None:
            n = 0
            while budget[0] > 0 and time.perf_counter() < hard_stop:
                budget[0] -= 1
                n += 1
                started = time.perf_counter()
                try:
                    result = await client.send(_session(args, w), "+15550100",
                                               f"{args.prefix} {w} {n}",
                                               idempotency_key=f"{args.prefix}-{w}-{n}")
                except BrokerError as exc:
                    window.error(exc.reason or exc.code.name)
                    continue
                if not result.acked:
                    window.error("NOT_ACKED")
                    continue
                if result.duplicate:
                    window.error("DUPLICATE")
                    continue
                window.record(started, time.perf_counter())

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    _result(**window.report(args.duration, concurrency=args.concurrency))


# -- http (the relay peers users run today) ------------------------------------------

async def run_http(args: argparse.Namespace) -> None:
    """Closed-loop ``POST /send`` on keep-alive connections, one per worker."""
    import aiohttp

    window = Window(args.warmup, args.duration)
    hard_stop = window.end + 0.001
    url = f"{args.target}/send"
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        budget = [args.max_requests]

        async def worker(w: int) -> None:
            n = 0
            while budget[0] > 0 and time.perf_counter() < hard_stop:
                budget[0] -= 1
                n += 1
                payload = {"session_id": args.session, "to": "+15550100",
                           "body": f"{args.prefix} {w} {n}",
                           "idempotency_key": f"{args.prefix}-{w}-{n}"}
                started = time.perf_counter()
                try:
                    async with http.post(url, json=payload) as response:
                        answer = await response.json()
                        if response.status != 200 or answer.get("status") != "ACKED":
                            window.error(f"HTTP_{response.status}")
                            continue
                except (aiohttp.ClientError, TimeoutError) as exc:
                    window.error(type(exc).__name__)
                    continue
                window.record(started, time.perf_counter())

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    _result(**window.report(args.duration, concurrency=args.concurrency))


# -- ws (the upstream floor) ------------------------------------------------------

async def run_ws(args: argparse.Namespace) -> None:
    """Send-and-ack straight to the simulator; `--sessions N`: N logins (N websockets),
    the workers spread over them as over the broker's sessions."""
    logins = [args.session] if args.sessions <= 1 else [_session(args, i)
                                                       for i in range(args.sessions)]
    async with contextlib.AsyncExitStack() as stack:
        gate = asyncio.Semaphore(32)  # pairing is HTTP to the simulator: not 1,000 at once

        async def login_one(login: str) -> Any:
            async with gate:
                return await upstream_login(args.upstream_url, args.control_url, login)

        sockets = await asyncio.gather(*(login_one(login) for login in logins))
        for ws in sockets:
            await stack.enter_async_context(ws)
        waiters: dict[str, asyncio.Future[None]] = {}

        async def read(ws: Any) -> None:
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "ack":
                    fut = waiters.pop(frame["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

        readers = [asyncio.create_task(read(ws)) for ws in sockets]
        window = Window(args.warmup, args.duration)
        budget = [args.max_requests]

        async def worker(w: int) -> None:
            ws = sockets[w % len(sockets)]
            n = 0
            while budget[0] > 0 and time.perf_counter() < window.end:
                budget[0] -= 1
                n += 1
                mid = f"m-{args.prefix}-{w}-{n}"
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                waiters[mid] = fut
                started = time.perf_counter()
                await ws.send(json.dumps({"type": "send", "id": mid, "to": "+15550100",
                                          "body": f"{args.prefix} {w} {n}"}))
                try:
                    async with asyncio.timeout(args.timeout):
                        await fut
                except TimeoutError:
                    window.error("TIMEOUT")
                    continue
                window.record(started, time.perf_counter())

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    _result(**window.report(args.duration, concurrency=args.concurrency))


# -- fanout --------------------------------------------------------------------------

async def run_fanout(args: argparse.Namespace) -> None:
    """Subscribe N streams over a few channels; report per-delivery and per-event latency.

    Reads commands on stdin: "reset" forgets what arrived so far (a profiled
    warm-up round), "done" reports; at most `max_seconds` in all.
    """
    channels = [grpc.aio.insecure_channel(args.target) for _ in range(args.channels)]
    arrivals: dict[tuple[str, int], list[float]] = {}
    ats: dict[tuple[str, int], float] = {}
    states: dict[tuple[str, int], str] = {}
    snapshots = [0]
    all_subscribed = asyncio.Event()
    cut_off = [0]

    async def subscriber(i: int) -> None:
        stub = pb_grpc.BrokerStub(channels[i % len(channels)])
        call = stub.StreamStatus(pb.StreamStatusRequest(session_ids=[args.session]))
        try:
            async for event in call:
                now = time.time()
                if event.snapshot:
                    snapshots[0] += 1
                    if snapshots[0] == args.subscribers:
                        all_subscribed.set()
                    continue
                key = (event.session_id, event.sequence)
                ats[key] = event.at.ToNanoseconds() / 1e9
                states[key] = pb.SessionState.Name(event.state)
                arrivals.setdefault(key, []).append(now)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                cut_off[0] += 1

    tasks = [asyncio.create_task(subscriber(i)) for i in range(args.subscribers)]
    await asyncio.wait_for(all_subscribed.wait(), 60)
    print("READY {}", flush=True)
    loop = asyncio.get_running_loop()
    give_up = time.monotonic() + args.max_seconds
    while (left := give_up - time.monotonic()) > 0:
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), left)
        except TimeoutError:
            break
        if line.strip() == "reset":
            await asyncio.sleep(0.5)  # the stragglers of the round being forgotten
            arrivals.clear()
            ats.clear()
            print("RESET", flush=True)
            continue
        break
    await asyncio.sleep(0.5)  # the last event's stragglers
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(None)
    per_delivery = [t - ats[k] for k, times in arrivals.items() for t in times]
    to_all = [max(times) - ats[k] for k, times in arrivals.items()]
    complete = sum(1 for times in arrivals.values() if len(times) == args.subscribers)
    _result(subscribers=args.subscribers, events=len(arrivals), complete_events=complete,
            cut_off=cut_off[0], per_delivery=summary_ms(per_delivery),
            time_to_all=summary_ms(to_all), **_by_burst(arrivals, ats, states))


_BURST_GAP_S = 0.2
"""Events of one change closer than this form a burst (a later one queues behind)."""


def _by_burst(arrivals: dict[tuple[str, int], list[float]], ats: dict[tuple[str, int], float],
              states: dict[tuple[str, int], str]) -> dict[str, Any]:
    """Where the tail is: per-delivery latency of an event that opens a burst of
    changes against one that follows another within _BURST_GAP_S (it queues behind
    it), the gap before a follow-up, and latency by state; and each burst's event
    offsets from its first event, the pattern the fan-out floor replays."""
    keys = sorted(arrivals, key=lambda k: ats[k])
    first: list[float] = []
    follow: list[float] = []
    gaps: list[float] = []
    by_state: dict[str, list[float]] = {}
    gap_by_state: dict[str, list[float]] = {}
    bursts: list[list[float]] = []
    opened = previous = 0.0
    for key in keys:
        at = ats[key]
        latencies = [t - at for t in arrivals[key]]
        state = states.get(key, "?")
        if bursts and at - previous < _BURST_GAP_S:
            follow.extend(latencies)
            gaps.append(at - previous)
            gap_by_state.setdefault(state, []).append(at - previous)
            bursts[-1].append(round(at - opened, 4))
        else:
            first.extend(latencies)
            bursts.append([0.0])
            opened = at
        previous = at
        by_state.setdefault(state, []).extend(latencies)
    out: dict[str, Any] = {"per_delivery_first_of_burst": summary_ms(first), "bursts": bursts}
    if follow:
        out["per_delivery_follow_up"] = summary_ms(follow)
        out["gap_before_follow_up"] = summary_ms(gaps)
    for state, latencies in sorted(by_state.items()):
        out[f"per_delivery_{state}"] = summary_ms(latencies)
    for state, state_gaps in sorted(gap_by_state.items()):
        out[f"gap_before_{state}"] = summary_ms(state_gaps)
    return out


# -- reliable (delivery under drops) -----------------------------------------------------

async def run_reliable(args: argparse.Namespace) -> None:
    """`concurrency` workers each send messages one after another for `duration`
    seconds, every one retried with its key until ACKED (bounded by `drain` seconds
    after the sending phase)."""
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pb_grpc.BrokerStub(channel)
        if args.wait_go:
            print("READY {}", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        t0 = time.monotonic()
        send_until, give_up = t0 + args.duration, t0 + args.duration + args.drain
        sent: list[str] = []
        acked: dict[str, str] = {}
        attempts = [0]
        errors: dict[str, int] = {}
        latencies: list[float] = []

        async def worker(w: int) -> None:
            n = 0
            while time.monotonic() < send_until and len(sent) < args.max_requests:
                n += 1
                body = f"{args.prefix} {w} {n}"
                sent.append(body)
                request = pb.SendRequest(session_id=args.session, to="+15550100", body=body,
                                         idempotency_key=f"{args.prefix}-{w}-{n}")
                started = time.monotonic()
                while time.monotonic() < give_up:
                    attempts[0] += 1
                    try:
                        response = await stub.Send(request, timeout=args.timeout)
                    except grpc.aio.AioRpcError as exc:
                        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                        if exc.code() not in _RETRYABLE:
                            break
                        await asyncio.sleep(0.05 if exc.code() ==
                                            grpc.StatusCode.DEADLINE_EXCEEDED else 0.2)
                        continue
                    if response.status == pb.ACKED:
                        acked[body] = response.message_id
                        latencies.append(time.monotonic() - started)
                        break
                if args.interval:
                    await asyncio.sleep(args.interval)

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    _result(sent=sent, acked=acked, attempts=attempts[0], errors=errors,
            ack_latency=summary_ms(latencies), elapsed_s=round(time.monotonic() - t0, 2))


# -- ideal (the reference under drops) -----------------------------------------------------

async def run_ideal(args: argparse.Namespace) -> None:
    """What the best possible client of the same upstream gets under the same drops: it
    reconnects at once on every drop, with no delay, no persistence and no gRPC hop,
    and resends every unacked message on the new connection. The same send pattern as
    `reliable`. Prints READY once paired and open, starts on a `go` line on stdin."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    creds = await pair_upstream(args.upstream_url, args.control_url, args.session)
    loop = asyncio.get_running_loop()
    hello = json.dumps({"type": "hello", "login": args.session, "credentials": creds})
    current: list[Any] = [None]
    opened = asyncio.Event()
    pending: dict[str, tuple[str, asyncio.Future[None]]] = {}
    spans: list[tuple[float, float]] = []  # OPEN (start, end), monotonic
    attempts = [0]
    done = [False]

    async def connection() -> None:
        while not done[0]:
            attempts[0] += 1
            try:
                async with connect(args.upstream_url, ping_interval=None,
                                   max_size=1 << 20) as ws:
                    await ws.send(hello)
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame.get("type") == "ready":
                            began = time.monotonic()
                            current[0] = ws
                            opened.set()
                            for mid, (body, _) in list(pending.items()):
                                await ws.send(json.dumps({"type": "send", "id": mid,
                                                          "to": "+15550100", "body": body}))
                        elif frame.get("type") == "ack":
                            entry = pending.pop(frame["id"], None)
                            if entry is not None and not entry[1].done():
                                entry[1].set_result(None)
            except (OSError, WebSocketException):
                pass
            finally:
                if current[0] is not None:
                    spans.append((began, time.monotonic()))
                current[0] = None
                opened.clear()

    conn = asyncio.create_task(connection())
    await asyncio.wait_for(opened.wait(), 30)
    print("READY {}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    t0 = time.monotonic()
    send_until, give_up = t0 + args.duration, t0 + args.duration + args.drain
    sent: list[str] = []
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def worker(w: int) -> None:
        n = 0
        while time.monotonic() < send_until and len(sent) < args.max_requests:
            n += 1
            mid, body = f"m-{args.prefix}-{w}-{n}", f"{args.prefix} {w} {n}"
            sent.append(body)
            fut: asyncio.Future[None] = loop.create_future()
            pending[mid] = (body, fut)
            started = time.monotonic()
            ws = current[0]
            if ws is not None:
                with contextlib.suppress(WebSocketException):
                    await ws.send(json.dumps({"type": "send", "id": mid, "to": "+15550100",
                                              "body": body}))
            try:
                await asyncio.wait_for(fut, max(0.0, give_up - time.monotonic()))
                latencies.append(time.monotonic() - started)
            except TimeoutError:
                errors["TIMEOUT"] = errors.get("TIMEOUT", 0) + 1
            if args.interval:
                await asyncio.sleep(args.interval)

    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    t1 = time.monotonic()
    done[0] = True
    ws = current[0]
    if ws is not None:
        with contextlib.suppress(Exception):
            await ws.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn, 5)
    window = min(t1, t0 + args.duration) - t0
    open_s = sum(max(0.0, min(e, t0 + window) - max(b, t0)) for b, e in spans)
    gaps = [b2 - e1 for (_, e1), (b2, _) in itertools.pairwise(spans)
            if t0 <= e1 <= t0 + window]
    _result(sent=len(sent), acked=len(latencies), errors=errors,
            availability=round(open_s / window, 4) if window > 0 else None,
            reconnect_gap=summary_ms(gaps), connection_attempts=attempts[0],
            ack_latency=summary_ms(latencies), elapsed_s=round(t1 - t0, 2))


def main(argv: list[str] | None = None) -> None:
    raise_nofile()
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.load")
    sub = parser.add_subparsers(dest="role", required=True)
    for name in ("send", "stream", "batch", "client", "http", "ws", "reliable", "ideal"):
        p = sub.add_parser(name)
        p.add_argument("--target", default="")
        p.add_argument("--upstream-url", default="")
        p.add_argument("--control-url", default="")
        p.add_argument("--session", required=True)
        p.add_argument("--concurrency", type=int, default=1)
        p.add_argument("--warmup", type=float, default=1.0)
        p.add_argument("--duration", type=float, default=5.0)
        p.add_argument("--drain", type=float, default=60.0)
        p.add_argument("--interval", type=float, default=0.0)
        p.add_argument("--max-requests", type=int, default=1_000_000)
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--prefix", default="b")
        p.add_argument("--sessions", type=int, default=1,
                       help="spread workers over N sessions <session>-0 .. <session>-N-1")
        p.add_argument("--batch", type=int, default=16, help="items per SendBatch (batch)")
        p.add_argument("--no-coalesce", action="store_true",
                       help="client: unary Send per call (BrokerClient(coalesce=False))")
        p.add_argument("--wait-go", action="store_true",
                       help="print READY, then start on a line on stdin (reliable)")
        p.add_argument("--cpu-of", action="append", default=[], metavar="NAME=PID",
                       help="also report NAME's CPU per request over the window")
    fan = sub.add_parser("fanout")
    fan.add_argument("--target", required=True)
    fan.add_argument("--session", required=True)
    fan.add_argument("--subscribers", type=int, default=1000)
    fan.add_argument("--channels", type=int, default=10)
    fan.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    for spec in getattr(args, "cpu_of", []):
        name, _, pid = spec.partition("=")
        _CPU_OF[name] = int(pid)
    runner = {"send": run_send, "stream": run_stream, "batch": run_batch,
              "client": run_client, "http": run_http, "ws": run_ws, "fanout": run_fanout,
              "reliable": run_reliable, "ideal": run_ideal}[args.role]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main(sys.argv[1:])
