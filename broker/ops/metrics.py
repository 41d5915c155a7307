"""Prometheus metrics of one broker instance, served over HTTP (`--metrics-listen`).

Three sources, none of which the runtime knows about:

- status events from the bus (connects, disconnects by code, reconnect time,
  missed keep-alives), counted only for sessions this instance owns: with
  Redis every instance sees every session's events, and a deployment-wide sum
  must not count a reconnect once per instance;
- the owned actors, read at scrape time (sessions by state, outbox depth,
  answered keep-alives, and per session the last hour's availability,
  reconnect gaps and attempts per minute);
- a gRPC server interceptor (RPC latency by method and code, Send outcomes,
  open status streams).

Each instance has its own registry, so several brokers in one process (the
tests) never share or clash over series.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from broker.api.status import ServerInterceptor
from broker.lifecycle.health import percentile
from broker.lifecycle.states import SPACED_OUT, State
from broker.ops import BusFollower
from broker.runtime.actor import SessionActor
from broker.runtime.manager import SessionManager
from broker.store.base import StatusEvent
from broker_client.v1 import broker_pb2 as pb

log = logging.getLogger(__name__)

SEND_METHOD = "/broker.v1.Broker/Send"
SEND_BATCH_METHOD = "/broker.v1.Broker/SendBatch"
SEND_STREAM_METHOD = "/broker.v1.Broker/SendStream"
#: Reason the lifecycle machine gives when a pong did not come back in time.
KEEPALIVE_TIMED_OUT = "keep-alive timed out"
#: Entering these ends a reconnect in progress (a person restarts from there),
#: as in broker.lifecycle.health.SessionStats.
_ENDS_RECONNECT = frozenset({State.STOPPED, State.LOGGED_OUT, State.FAILED})
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)
_RECONNECT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                      600.0)
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

class BrokerMetrics:
    """The metrics of one instance; `start()` to observe, `serve()` to expose."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connects = Counter("broker_connects", "Times an owned session became OPEN.",
                                registry=r)
        self.disconnects = Counter(
            "broker_disconnects", "Times an owned session left OPEN, by disconnect reason code "
            "(0: closed by the broker, e.g. stop or handover).", ["code"], registry=r)
        self.reconnect_seconds = Histogram(
            "broker_reconnect_seconds", "Time from leaving OPEN to OPEN again.",
            buckets=_RECONNECT_BUCKETS, registry=r)
        self.keepalives = Counter(
            "broker_keepalives", "Keep-alive pings by result: ok (pong received) or missed "
            "(no pong in time; the connection was closed).", ["result"], registry=r)
        self.sends = Counter(
            "broker_sends", "Send RPCs by outcome: acked, queued, or the error reason.",
            ["outcome"], registry=r)
        self.rpc_seconds = Histogram(
            "broker_rpc_duration_seconds", "Unary RPC latency by method and status code.",
            ["method", "code"], buckets=_RPC_BUCKETS, registry=r)
        self.streams = Gauge(
            "broker_stream_subscribers", "Open server streams by method "
            "(StreamStatus: status subscribers; Receive: inbound workers).", ["method"],
            registry=r)
        self.attempts = Counter(
            "broker_connect_attempts", "Upstream connection attempts of owned sessions "
            "(every CONNECTING, the restart after pairing included).", registry=r)
        self.held_back = Counter(
            "broker_connect_attempts_held_back", "Connection attempts the attempt budget "
            "spaced out (--attempt-burst / --attempt-rate): the session is flapping.",
            registry=r)
        self.streams_total = Counter(
            "broker_streams", "Server streams ended, by method and status code.",
            ["method", "code"], registry=r)
        for result in ("ok", "missed"):
            self.keepalives.labels(result)
        self.streams.labels("broker.v1.Broker/StreamStatus")
        self._state_collector = _SessionCollector(self)
        r.register(self._state_collector)
        self.outbox: dict[tuple[str, str], int] = {}
        self._left_open_at: dict[str, float] = {}
        self._pongs_seen: weakref.WeakKeyDictionary[SessionActor, int] = (
            weakref.WeakKeyDictionary())
        self._follower = BusFollower(manager.bus, self.observe, "metrics")
        self._server: asyncio.Server | None = None
        self.address = ""

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._follower.start()

    async def serve(self, listen: str) -> None:
        """Expose /metrics over plain HTTP on `listen` ("host:port", port 0: any)."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self._server = await asyncio.start_server(self._handle_http, host, int(port))
        bound = self._server.sockets[0].getsockname()
        self.address = f"{host}:{bound[1]}"
        log.info("metrics on http://%s/metrics", self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
        await self._follower.stop()

    # -- status events -------------------------------------------------------

    def observe(self, event: StatusEvent) -> None:
        """Count one status event, if this instance owns its session."""
        if event.session_id not in self.manager.actors:
            return
        if event.state == State.CONNECTING:
            self.attempts.inc()  # also CONNECTING -> CONNECTING: the 515 restart
        if event.state == State.RECONNECTING and SPACED_OUT in event.reason:
            self.held_back.inc()
        if event.state == event.previous:
            return
        sid = event.session_id
        if event.previous == State.OPEN:
            self.disconnects.labels(str(event.code)).inc()
            self._left_open_at[sid] = event.at
            if event.reason == KEEPALIVE_TIMED_OUT:
                self.keepalives.labels("missed").inc()
        if event.state == State.OPEN:
            self.connects.inc()
            left = self._left_open_at.pop(sid, None)
            if left is not None:
                self.reconnect_seconds.observe(max(0.0, event.at - left))
        elif event.state in _ENDS_RECONNECT:
            self._left_open_at.pop(sid, None)

    # -- scrape --------------------------------------------------------------

    async def refresh(self) -> None:
        """Read what only the actors and the store know, just before a scrape."""
        outbox: dict[tuple[str, str], int] = {}
        for sid, actor in tuple(self.manager.actors.items()):
            with contextlib.suppress(Exception):  # a store outage must not break scraping
                outbox[(sid, actor.tenant)] = await self.manager.store.outbox_depth(sid)
            # Answered pings live in the actor's stats; count only what is new since
            # the last scrape so a replaced actor never makes the counter go back.
            ok = actor.stats.keepalive_ok
            new = ok - self._pongs_seen.get(actor, 0)
            if new > 0:
                self.keepalives.labels("ok").inc(new)
            self._pongs_seen[actor] = ok
        self.outbox = outbox

    async def scrape(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)

    async def _handle_http(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10.0):
                request = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if path.split("?", 1)[0] in ("/metrics", "/") and method in ("GET", "HEAD"):
                body = await self.scrape()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
            else:
                body = b"not found: scrape /metrics\n"
                head = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ValueError, OSError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # a broken or silent client; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- gRPC ----------------------------------------------------------------

    def interceptor(self) -> grpc.aio.ServerInterceptor[Any, Any]:
        return _MetricsInterceptor(self)

    def on_rpc(self, method: str, code: grpc.StatusCode, seconds: float, response: Any,
               context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.rpc_seconds.labels(method.lstrip("/"), code.name).observe(seconds)
        if method == SEND_METHOD:
            self.sends.labels(_send_outcome(code, response, context)).inc()
        elif method == SEND_BATCH_METHOD and isinstance(response, pb.SendBatchResponse):
            self.on_send_results(response)

    def on_send_results(self, response: pb.SendBatchResponse) -> None:
        """Each message of a SendBatch or SendStream answer, counted as a unary Send is."""
        for result in response.results:
            if result.HasField("error"):
                outcome = pb.ErrorReason.Reason.Name(result.error.reason)
            else:
                outcome = "acked" if result.response.status == pb.ACKED else "queued"
            self.sends.labels(outcome).inc()


class _SessionCollector(Collector):
    """Gauges computed from the owned actors at scrape time (never stale)."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # computed series: skip the registration-time collect

    def collect(self) -> Iterable[Metric]:
        manager = self._metrics.manager
        states = GaugeMetricFamily("broker_sessions", "Sessions owned by this instance, by state.",
                                   labels=["state"])
        counts = dict.fromkeys(State, 0)
        for actor in tuple(manager.actors.values()):
            counts[actor.state] += 1
        for state, n in counts.items():
            states.add_metric([state.value], n)
        yield states
        depth = GaugeMetricFamily(
            "broker_outbox_depth", "Messages accepted and not yet acked, per owned session.",
            labels=["session_id", "tenant"])
        total = 0
        for (sid, tenant), n in sorted(self._metrics.outbox.items()):
            depth.add_metric([sid, tenant], n)
            total += n
        yield depth
        yield GaugeMetricFamily("broker_outbox_depth_total",
                                "Messages waiting in the outboxes of owned sessions.", value=total)
        yield from self._availability(manager)

    def _availability(self, manager: SessionManager) -> Iterable[Metric]:
        now = manager.clock()
        labels = ["session_id", "tenant"]
        availability = GaugeMetricFamily(
            "broker_session_availability", "Fraction of the last hour an owned session was "
            "OPEN, counted from its first OPEN (sessions that opened).", labels=labels)
        gaps = GaugeMetricFamily(
            "broker_session_reconnect_gap_seconds", "Reconnect gaps (leaving OPEN to OPEN "
            "again) of the last hour per owned session: quantile 0.5, 0.99 and 1 (the max).",
            labels=[*labels, "quantile"])
        attempts = GaugeMetricFamily(
            "broker_session_connect_attempts_per_minute", "Connection attempts per minute "
            "over the last 10 minutes, per owned session.", labels=labels)
        for sid, actor in sorted(tuple(manager.actors.items())):
            stats, key = actor.stats, [sid, actor.tenant]
            share, window = stats.availability(now)
            if window > 0:
                availability.add_metric(key, share)
            recent = stats.reconnect_gaps_ms(now)
            if recent:
                for q, ms in (("0.5", percentile(recent, 0.5)), ("0.99", percentile(recent, 0.99)),
                              ("1", max(recent))):
                    gaps.add_metric([*key, q], ms / 1000.0)
            attempts.add_metric(key, stats.attempts_per_minute(now))
        yield availability
        yield gaps
        yield attempts


def _send_outcome(code: grpc.StatusCode, response: Any,
                  context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """acked / queued for a successful Send, else the error's machine-readable reason."""
    if code == grpc.StatusCode.OK:
        acked = isinstance(response, pb.SendResponse) and response.status == pb.ACKED
        return "acked" if acked else "queued"
    for key, value in context.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.reason:
                    return str(info.reason)
    return code.name


def _status_code(context: grpc.aio.ServicerContext[Any, Any],
                 error: BaseException | None) -> grpc.StatusCode:
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions hand back the raw number
        for known in grpc.StatusCode:
            if known.value[0] == code:
                return known
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class _MetricsInterceptor(ServerInterceptor):
    """Times unary calls and counts open streams without changing what they do."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        h: Any = handler
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, h.unary_unary),
                request_deserializer=h.request_deserializer,
                response_serializer=h.response_serializer)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, h.unary_stream),
                request_deserializer=h.request_deserializer,
                response_serializer=h.response_serializer)
        if h.stream_stream is not None and method == SEND_STREAM_METHOD:
            return grpc.stream_stream_rpc_method_handler(
                self._send_stream(method, h.stream_stream),
                request_deserializer=h.request_deserializer,
                response_serializer=h.response_serializer)
        return handler  # other client and bidi streams (reflection): not measured

    def _send_stream(self, method: str, behavior: Any) -> Any:
        """SendStream: an open stream like the others, and every message's outcome."""
        counted = self._stream(method, behavior)
        metrics = self._metrics

        async def each(requests: Any, context: grpc.aio.ServicerContext[Any, Any]
                       ) -> AsyncIterator[Any]:
            async for response in counted(requests, context):
                metrics.on_send_results(response)
                yield response

        return each

    def _unary(self, method: str, behavior: Any) -> Any:
        metrics = self._metrics

        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            response: Any = None
            error: BaseException | None = None
            try:
                response = await behavior(request, context)
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                metrics.on_rpc(method, _status_code(context, error),
                               time.perf_counter() - started, response, context)

        return timed

    def _stream(self, method: str, behavior: Any) -> Any:
        gauge = self._metrics.streams.labels(method.lstrip("/"))
        ended = self._metrics.streams_total

        def done(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> None:
            gauge.dec()
            ended.labels(method.lstrip("/"), _status_code(context, error).name).inc()

        if inspect.isasyncgenfunction(behavior):
            async def counted_gen(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                gauge.inc()
                error: BaseException | None = None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    done(context, error)

            return counted_gen

        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            gauge.inc()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                done(context, error)

        return counted
