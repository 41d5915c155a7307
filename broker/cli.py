"""The `broker` command: run the service, and the people commands that talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from google.protobuf.json_format import MessageToDict

from broker import errors, logs
from broker.auth.cli import token
from broker.config import Settings
from broker.datadir import DATA_DIR_ENV, default_data_dir, default_store_url
from broker.lifecycle.policy import LifecyclePolicy
from broker.simulator.cli import sim
from broker.store.crypto import CredentialKeyError
from broker_client import BrokerClient, BrokerError
from broker_client.v1 import broker_pb2 as pb

T = TypeVar("T")
_S = Settings()
_P = LifecyclePolicy()
"""Flag defaults come from the settings' own defaults: one source of truth."""
DEFAULT_TARGET = "127.0.0.1:50051"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except BrokerError as exc:
        raise click.ClickException(f"{exc.code.name} {exc.reason}: {exc.message}") from exc


@click.group()
@click.version_option(package_name="session-broker")
def main() -> None:
    """gRPC connection broker: one owner for every upstream messaging session."""


main.add_command(sim)
main.add_command(token)


async def _until_signalled() -> None:
    """Return on SIGINT or SIGTERM: what a long-running command serves until."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@main.command()
@click.option("--listen", envvar="BROKER_LISTEN", default=_S.listen, show_default=True,
              help="gRPC listen address.")
@click.option("--upstream-url", envvar="BROKER_UPSTREAM_URL", default=None,
              help="Upstream websocket URL; unset: start the embedded simulator.")
@click.option("--sim-port", envvar="BROKER_SIM_PORT", default=_S.simulator_port, show_default=True,
              help="Port of the embedded simulator (websocket + /control).")
@click.option("--data-dir", envvar=DATA_DIR_ENV, type=click.Path(file_okay=False),
              default=str(default_data_dir()), show_default=True,
              help="Where the default SQLite database, its credential key file and the "
                   "embedded simulator's logins live (created on first start).")
@click.option("--store", "store_url", envvar="BROKER_STORE", default=None,
              show_default="sqlite:///<data dir>/broker.db",
              help="Store URL: sqlite:///path/to/broker.db (one process), memory:// (tests, "
                   "demos: forgets everything on exit) or redis://host:port/db (several "
                   "instances).")
@click.option("--backoff-initial", envvar="BROKER_BACKOFF_INITIAL", type=float,
              default=_P.backoff_initial_s,
              show_default=True, help="First reconnect backoff ceiling, seconds.")
@click.option("--backoff-max", envvar="BROKER_BACKOFF_MAX", type=float, default=_P.backoff_max_s,
              show_default=True, help="Reconnect backoff cap, seconds.")
@click.option("--slow-backoff-initial", envvar="BROKER_SLOW_BACKOFF_INITIAL", type=float,
              default=_P.slow_backoff_initial_s, show_default=True,
              help="Backoff after 503/429, seconds.")
@click.option("--slow-backoff-max", envvar="BROKER_SLOW_BACKOFF_MAX", type=float,
              default=_P.slow_backoff_max_s,
              show_default=True, help="Backoff cap after 503/429, seconds.")
@click.option("--conflict-retry", envvar="BROKER_CONFLICT_RETRY", type=float,
              default=_P.conflict_retry_s or 0,
              show_default=True, help="Retry after a 440 conflict, seconds (0: never).")
@click.option("--redial-max", envvar="BROKER_REDIAL_MAX", type=click.FloatRange(0),
              default=_P.redial_max_s, show_default=True,
              help="A connection that had opened and dropped is redialled after a random "
                   "0 to this many seconds.")
@click.option("--attempt-burst", envvar="BROKER_ATTEMPT_BURST", type=click.IntRange(0),
              default=_P.attempt_burst, show_default=True,
              help="Connection attempts per session at once before they are spaced out "
                   "(0: no bound).")
@click.option("--attempt-rate", envvar="BROKER_ATTEMPT_RATE", type=click.FloatRange(0),
              default=_P.attempt_rate_per_min, show_default=True,
              help="Sustained connection attempts per session per minute past the burst "
                   "(0: no bound).")
@click.option("--stable-after", envvar="BROKER_STABLE_AFTER", type=float, default=None,
              hidden=True, help="Deprecated and ignored: an attempt that opens resets the "
                                "backoff; see --attempt-burst / --attempt-rate.")
@click.option("--max-attempts", envvar="BROKER_MAX_ATTEMPTS", type=int, default=_P.max_attempts,
              show_default=True, help="Failed attempts in a row before FAILED (0: never).")
@click.option("--keepalive-interval", envvar="BROKER_KEEPALIVE_INTERVAL", type=float,
              default=_P.keepalive_interval_s or 0, show_default=True,
              help="Keep-alive ping interval, seconds (0: off).")
@click.option("--keepalive-timeout", envvar="BROKER_KEEPALIVE_TIMEOUT", type=float,
              default=_P.keepalive_timeout_s,
              show_default=True, help="Missed pong after this long reconnects, seconds.")
@click.option("--max-qr-codes", envvar="BROKER_MAX_QR_CODES", type=int, default=_P.max_qr_codes,
              show_default=True, help="QR codes shown before pairing gives up.")
@click.option("--connect-timeout", envvar="BROKER_CONNECT_TIMEOUT", type=float,
              default=_S.connect_timeout_s,
              show_default=True, help="Upstream connect and handshake timeout, seconds.")
@click.option("--ack-timeout", envvar="BROKER_ACK_TIMEOUT", type=float, default=_S.ack_timeout_s,
              show_default=True, help="Resend an unacked message after, seconds.")
@click.option("--send-window", envvar="BROKER_SEND_WINDOW", type=int, default=_S.send_window,
              show_default=True, help="Messages in flight per session.")
@click.option("--write-linger", envvar="BROKER_WRITE_LINGER", type=click.FloatRange(0, 1),
              default=_S.write_linger_s, show_default=True,
              help="Under load, seconds a session's next outbox write waits to gather "
                   "more Sends and acks (0: never).")
@click.option("--inbound-retention", envvar="BROKER_INBOUND_RETENTION",
              type=click.FloatRange(0), default=_S.inbound_retention_s, show_default=True,
              help="Seconds an inbound message is kept for worker groups, acked or not "
                   "(0: for ever).")
@click.option("--max-outbox", envvar="BROKER_MAX_OUTBOX", type=int, default=_S.max_outbox,
              show_default=True, help="Undelivered messages per session before OUTBOX_FULL.")
@click.option("--max-body-bytes", envvar="BROKER_MAX_BODY_BYTES", type=int,
              default=_S.max_body_bytes,
              show_default=True, help="Largest message body accepted.")
@click.option("--send-timeout", envvar="BROKER_SEND_TIMEOUT", type=float,
              default=_S.default_send_timeout_s,
              show_default=True, help="Ack wait for Send calls without a deadline, seconds.")
@click.option("--instance-id", envvar="BROKER_INSTANCE_ID", default="",
              help="Name of this instance with Redis (default: host-pid-random).")
@click.option("--lease-ttl", envvar="BROKER_LEASE_TTL", type=float, default=_S.lease_ttl_s,
              show_default=True, help="Session ownership lease TTL with Redis, seconds.")
@click.option("--key-prefix", envvar="BROKER_KEY_PREFIX", default=_S.key_prefix, show_default=True,
              help="Prefix of every Redis key.")
@click.option("--auth-tokens", envvar="BROKER_AUTH_TOKENS", default=None,
              help="Token file from `broker token create` (unset: no auth, loopback only).")
@click.option("--tls-cert", envvar="BROKER_TLS_CERT", default=None,
              help="PEM server certificate chain (with --tls-key: serve TLS).")
@click.option("--tls-key", envvar="BROKER_TLS_KEY", default=None, help="PEM server private key.")
@click.option("--tls-client-ca", envvar="BROKER_TLS_CLIENT_CA", default=None,
              help="PEM CA that client certificates must chain to (mutual TLS).")
@click.option("--rate-limit", envvar="BROKER_RATE_LIMIT", type=float, default=0.0,
              show_default=True, help="Messages per second per session (0: no limit).")
@click.option("--rate-burst", envvar="BROKER_RATE_BURST", type=int, default=0,
              show_default=True, help="Messages at once after a quiet spell (0: one second's).")
@click.option("--log-level", envvar="BROKER_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", envvar="BROKER_LOG_FORMAT", default="text", show_default=True,
              type=click.Choice(["text", "json"]))
@click.option("--dashboard-listen", envvar="BROKER_DASHBOARD_LISTEN", default="",
              help="Serve the web dashboard on host:port, e.g. 127.0.0.1:8080 "
                   "(default: off; no authentication, keep it on loopback).")
@click.option("--metrics-listen", envvar="BROKER_METRICS_LISTEN", default="",
              help="Serve Prometheus metrics at http://host:port/metrics, e.g. "
                   "127.0.0.1:9464 (default: off).")
@click.option("--webhooks", "webhooks_file", envvar="BROKER_WEBHOOKS", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="JSON file tenant -> {url, secret} ('*': default) for notifications when "
                   "a session needs a person (default: none).")
@click.option("--webhook-max-attempts", envvar="BROKER_WEBHOOK_MAX_ATTEMPTS", type=int,
              default=12, show_default=True, help="Attempts per webhook notification.")
@click.option("--webhook-max-time", envvar="BROKER_WEBHOOK_MAX_TIME", type=float, default=900.0,
              show_default=True, help="Stop retrying a webhook notification after, seconds.")
def serve(**opts: Any) -> None:
    """Run the broker (defaults: a SQLite store in the data directory, the embedded
    simulator upstream)."""
    logs.setup(opts["log_level"], opts["log_format"])
    if opts["stable_after"] is not None:
        logging.getLogger("broker").warning(
            "--stable-after / BROKER_STABLE_AFTER is ignored: a connection that opens resets "
            "the backoff at once; reconnect storms are bounded by --attempt-burst and "
            "--attempt-rate")
    policy = LifecyclePolicy(
        backoff_initial_s=opts["backoff_initial"], backoff_max_s=opts["backoff_max"],
        slow_backoff_initial_s=opts["slow_backoff_initial"],
        slow_backoff_max_s=opts["slow_backoff_max"],
        conflict_retry_s=opts["conflict_retry"] or None, redial_max_s=opts["redial_max"],
        attempt_burst=opts["attempt_burst"], attempt_rate_per_min=opts["attempt_rate"],
        max_attempts=opts["max_attempts"],
        keepalive_interval_s=opts["keepalive_interval"] or None,
        keepalive_timeout_s=opts["keepalive_timeout"], max_qr_codes=opts["max_qr_codes"],
    )
    settings = Settings(
        listen=opts["listen"], upstream_url=opts["upstream_url"], simulator_port=opts["sim_port"],
        store_url=opts["store_url"] or default_store_url(Path(opts["data_dir"])),
        data_dir=opts["data_dir"], lifecycle=policy, connect_timeout_s=opts["connect_timeout"],
        ack_timeout_s=opts["ack_timeout"], send_window=opts["send_window"],
        write_linger_s=opts["write_linger"], inbound_retention_s=opts["inbound_retention"],
        max_outbox=opts["max_outbox"], max_body_bytes=opts["max_body_bytes"],
        default_send_timeout_s=opts["send_timeout"], instance_id=opts["instance_id"],
        lease_ttl_s=opts["lease_ttl"], key_prefix=opts["key_prefix"],
        auth_tokens_file=opts["auth_tokens"], tls_cert_file=opts["tls_cert"],
        tls_key_file=opts["tls_key"], tls_client_ca_file=opts["tls_client_ca"],
        rate_limit=opts["rate_limit"], rate_burst=opts["rate_burst"],
        dashboard_listen=opts["dashboard_listen"] or None,
        metrics_listen=opts["metrics_listen"] or None, webhooks_file=opts["webhooks_file"],
        webhook_max_attempts=opts["webhook_max_attempts"],
        webhook_max_time_s=opts["webhook_max_time"],
    )
    try:
        asyncio.run(_serve(settings))
    except (CredentialKeyError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    except errors.BrokerError as exc:  # a live duplicate of --instance-id, a locked database
        raise click.ClickException(f"{exc.reason}: {exc.message}") from exc


async def _serve(settings: Settings) -> None:
    from broker.app import BrokerApp

    app = BrokerApp(settings)
    await app.start()
    click.echo(f"broker listening on {app.address}", err=True)
    if app.simulator is not None:
        click.echo(f"embedded simulator: {app.simulator.url} "
                   f"(control: {app.simulator.control_url})", err=True)
    if app.dashboard is not None:
        click.echo(f"dashboard: {app.dashboard.url}", err=True)
    if app.metrics is not None:
        click.echo(f"metrics: http://{app.metrics.address}/metrics", err=True)
    await _until_signalled()
    click.echo("shutting down", err=True)
    await app.stop()


@dataclass(frozen=True)
class Connection:
    """Where the people commands reach the broker, and with which credentials."""

    target: str
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def client(self, **options: Any) -> BrokerClient:
        return BrokerClient(self.target, token=self.token, tls_ca=self.tls_ca,
                            tls_cert=self.tls_cert, tls_key=self.tls_key, **options)

    def __str__(self) -> str:
        return self.target


F = TypeVar("F", bound=Callable[..., Any])


def target_option(func: F) -> F:
    """--target plus the token and TLS options every people command shares."""

    @click.option("--target", envvar="BROKER_TARGET", default=DEFAULT_TARGET,
                  show_default=True, help="Broker gRPC address.")
    @click.option("--token", envvar="BROKER_TOKEN", default=None,
                  help="Bearer token when the broker has authentication on.")
    @click.option("--tls-ca", envvar="BROKER_TLS_CA", default=None,
                  help="PEM CA to trust when the broker serves TLS.")
    @click.option("--tls-cert", envvar="BROKER_TLS_CLIENT_CERT", default=None,
                  help="This client's PEM certificate (mutual TLS).")
    @click.option("--tls-key", envvar="BROKER_TLS_CLIENT_KEY", default=None,
                  help="This client's PEM key (mutual TLS).")
    @functools.wraps(func)
    def wrapper(*args: Any, target: str, token: str | None, tls_ca: str | None,
                tls_cert: str | None, tls_key: str | None, **kwargs: Any) -> Any:
        conn = Connection(target, token, tls_ca, tls_cert, tls_key)
        return func(*args, target=conn, **kwargs)

    return cast(F, wrapper)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _print(message: Any, as_json: bool, text: Callable[[], str]) -> None:
    if as_json:
        click.echo(json.dumps(MessageToDict(message), indent=2))
    else:
        click.echo(text())


def _state(value: int) -> str:
    return pb.SessionState.Name(value)  # type: ignore[arg-type]


def _session_line(s: pb.Session) -> str:
    extra = f" ({s.reason}{', code ' + str(s.code) if s.code else ''})" if s.reason else ""
    creds = "credentials" if s.has_credentials else "no credentials"
    return f"{s.session_id:<20} {s.tenant:<12} {_state(s.state):<13} {creds}, " \
           f"outbox {s.outbox_depth}{extra}"


@main.command()
@target_option
@click.argument("session_id")
@click.argument("to")
@click.argument("body")
@click.option("--key", default=None, help="Idempotency key (default: a new one).")
@click.option("--no-wait", is_flag=True, help="Return once queued, without waiting for the ack.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
def send(target: Connection, session_id: str, to: str, body: str, key: str | None, no_wait: bool,
         timeout: float) -> None:
    """Send BODY to TO through session SESSION_ID."""

    async def go() -> None:
        async with target.client(timeout=timeout) as client:
            result = await client.send(session_id, to, body, idempotency_key=key,
                                       wait=not no_wait)
        status = "acked" if result.acked else "queued"
        click.echo(f"{result.message_id} {status}{' (duplicate)' if result.duplicate else ''}")

    _run(go())


@main.command()
@target_option
@click.argument("session_ids", nargs=-1)
@click.option("--tenant", default="")
@click.option("--count", type=int, default=0, help="Stop after this many events (0: never).")
@json_option
def watch(target: Connection, session_ids: tuple[str, ...], tenant: str, count: int,
          as_json: bool) -> None:
    """Print live status events (a snapshot first), reconnecting as needed."""

    async def go() -> None:
        seen = 0
        async with target.client() as client:
            async for event in client.watch_status(list(session_ids), tenant):
                _print(event, as_json, lambda e=event: _event_line(e))  # type: ignore[misc]
                seen += 1
                if count and seen >= count:
                    return

    with contextlib.suppress(KeyboardInterrupt):
        _run(go())


def _event_line(e: pb.StatusEvent) -> str:
    parts = [f"#{e.sequence}", e.session_id, f"{_state(e.previous_state)} -> {_state(e.state)}"]
    if e.snapshot:
        parts = [f"#{e.sequence}", e.session_id, f"{_state(e.state)} (snapshot)"]
    if e.reason:
        parts.append(f"reason: {e.reason}")
    if e.code:
        parts.append(f"code {e.code}")
    if e.retry_in_ms:
        parts.append(f"retry in {e.retry_in_ms} ms")
    if e.qr:
        parts.append("QR ready: run `broker qr " + e.session_id + "`")
    return "  ".join(parts)


@main.command()
@target_option
@click.argument("session_ids", nargs=-1)
@click.option("--tenant", default="")
@json_option
def health(target: Connection, session_ids: tuple[str, ...], tenant: str, as_json: bool) -> None:
    """Diagnose sessions: state, counters, recent transitions, recommendations."""

    async def go() -> list[pb.SessionHealth]:
        async with target.client() as client:
            return await client.health(list(session_ids), tenant)

    items = _run(go())
    if as_json:
        click.echo(json.dumps([MessageToDict(i) for i in items], indent=2))
        return
    for h in items:
        c = h.counters
        mark = "healthy" if h.healthy else "NEEDS ATTENTION"
        click.echo(f"{h.session.session_id}: {_state(h.session.state)} - {mark}")
        click.echo(f"  disconnects last hour {c.disconnects_last_hour}, reconnect mean "
                   f"{c.reconnect_ms_mean:.0f} ms, keep-alive {c.keepalive_success_rate:.0%}, "
                   f"delivery {c.delivery_rate:.0%}, outbox {c.outbox_depth}")
        if c.availability_window_s:
            click.echo(f"  OPEN {c.availability_last_hour:.1%} of the last "
                       f"{c.availability_window_s / 60:.0f} min, reconnect gaps p50 "
                       f"{c.reconnect_gap_ms_p50:.0f} / p99 {c.reconnect_gap_ms_p99:.0f} / max "
                       f"{c.reconnect_gap_ms_max:.0f} ms, {c.attempts_per_minute:.1f} attempts/min"
                       + (f", {c.attempts_held_back_last_hour} held back"
                          if c.attempts_held_back_last_hour else ""))
        for t in list(h.recent)[-5:]:
            click.echo(f"  {_state(t.from_state)} -> {_state(t.to_state)}: {t.reason}")
        for r in h.recommendations:
            click.echo(f"  [{pb.Severity.Name(r.severity)}] {r.code}: {r.message}")


@main.command()
@target_option
@click.argument("session_id")
def qr(target: Connection, session_id: str) -> None:
    """Print the session's pairing QR code in the terminal."""
    import qrcode

    async def go() -> pb.QrCode:
        async with target.client() as client:
            return await client.get_qr(session_id)

    code = _run(go())
    image = qrcode.QRCode(border=1)
    image.add_data(code.qr)
    image.print_ascii(out=sys.stdout, invert=True)
    click.echo(f"QR #{code.index} for {session_id}: {code.qr}")


@main.group()
def sessions() -> None:
    """Manage sessions: create, list, get, stop, restart, logout, delete."""


def _admin(name: str, doc: str) -> None:
    @sessions.command(name=name, help=doc)
    @target_option
    @click.argument("session_id")
    @json_option
    def command(target: Connection, session_id: str, as_json: bool) -> None:
        async def go() -> Any:
            async with target.client() as client:
                return await getattr(client, f"{name}_session")(session_id)

        result = _run(go())
        if isinstance(result, pb.Session):
            _print(result, as_json, lambda: _session_line(result))
        else:
            click.echo(f"{session_id} deleted")


for _name, _doc in [
    ("get", "Show one session."),
    ("stop", "Close the upstream connection and keep it closed."),
    ("restart", "Connect again now, resetting backoff (starts pairing after a logout)."),
    ("logout", "Log out upstream and wipe the stored credentials."),
    ("delete", "Forget the session, its credentials and its queued messages."),
]:
    _admin(_name, _doc)


@sessions.command(name="create")
@target_option
@click.argument("session_id")
@click.option("--tenant", default="", help="Owning tenant (default: 'default').")
@click.option("--no-start", is_flag=True, help="Declare without connecting.")
@json_option
def create(target: Connection, session_id: str, tenant: str, no_start: bool, as_json: bool) -> None:
    """Declare a session and start connecting (idempotent)."""

    async def go() -> pb.Session:
        async with target.client() as client:
            return await client.create_session(session_id, tenant, start=not no_start)

    result = _run(go())
    _print(result, as_json, lambda: _session_line(result))


@sessions.command(name="list")
@target_option
@click.option("--tenant", default="")
@json_option
def list_(target: Connection, tenant: str, as_json: bool) -> None:
    """List sessions and their states."""

    async def go() -> list[pb.Session]:
        async with target.client() as client:
            return await client.list_sessions(tenant)

    items = _run(go())
    if as_json:
        click.echo(json.dumps([MessageToDict(s) for s in items], indent=2))
    for s in items if not as_json else []:
        click.echo(_session_line(s))


@main.command()
@target_option
@click.option("--listen", envvar="BROKER_DASHBOARD_LISTEN", default="127.0.0.1:8080",
              show_default=True, help="Web dashboard address (no authentication: keep it local).")
def dashboard(target: Connection, listen: str) -> None:
    """Serve the live web dashboard (sessions, states, pairing QR) for a running broker."""
    from broker.dashboard import DashboardServer

    async def go() -> None:
        client = target.client()
        async with DashboardServer(target.target, listen, client=client) as server:
            click.echo(f"dashboard: {server.url} (broker {target})", err=True)
            await _until_signalled()
        await client.close()

    try:
        _run(go())
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
