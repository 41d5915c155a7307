"""The people commands: send a message, watch live status, print a session's health
and its QR code, manage sessions, serve the dashboard, against a running broker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import click
from google.protobuf.json_format import MessageToDict

from broker.signals import until_signalled
from broker_client import BrokerClient, BrokerError
from broker_client.v1 import broker_pb2 as pb

T = TypeVar("T")
DEFAULT_TARGET = "127.0.0.1:50051"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except BrokerError as exc:
        raise click.ClickException(f"{exc.code.name} {exc.reason}: {exc.message}") from exc


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


@click.command()
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


@click.command()
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


@click.command()
@target_option
@click.argument("session_ids", nargs=-1)
@click.option("--tenant", default="")
@json_option
def health(target: Connection, session_ids: tuple[str, ...], tenant: str, as_json: bool) -> None:
    """Diagnose sessions: state, counters, recent transitions, recommendations."""

    async def go() -> pb.HealthResponse:
        async with target.client() as client:
            return await client.health_report(list(session_ids), tenant)

    report = _run(go())
    items = list(report.sessions)
    if as_json:
        click.echo(json.dumps([MessageToDict(i) for i in items], indent=2))
        return
    running = report.engine
    if running.name:
        click.echo(f"engine {running.name}: {'up' if running.up else 'DOWN'} - "
                   f"{running.detail}")
    for h in items:
        c = h.counters
        mark = "healthy" if h.healthy else "NEEDS ATTENTION"
        engine = f" on {h.engine}" if h.engine else ""
        click.echo(f"{h.session.session_id}: {_state(h.session.state)}{engine} - {mark}")
        click.echo(f"  disconnects last hour {c.disconnects_last_hour}, reconnect mean "
                   f"{c.reconnect_ms_mean:.0f} ms, keep-alive {c.keepalive_success_rate:.0%}, "
                   f"delivery {c.delivery_rate:.0%}, outbox {c.outbox_depth}"
                   + (f", {c.messages_refused} refused" if c.messages_refused else ""))
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


@click.command()
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


@click.command()
@target_option
@click.argument("session_id")
@click.option("--phone", required=True,
              help="The login's phone number in E.164, e.g. +4915123456789.")
def pair(target: Connection, session_id: str, phone: str) -> None:
    """Pair a session by phone number: print the code to type into the phone."""

    async def go() -> str:
        async with target.client() as client:
            return await client.request_pairing_code(session_id, phone)

    code = _run(go())
    click.echo(f"pairing code for {session_id}: {code[:4]}-{code[4:]}")
    click.echo("on the phone: WhatsApp > Linked devices > Link a device > Link with phone "
               "number instead, then type the code", err=True)


@click.group()
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


@click.command()
@target_option
@click.option("--listen", envvar="BROKER_DASHBOARD_LISTEN", default="127.0.0.1:8080",
              show_default=True, help="Web dashboard address (keep it local unless the broker "
              "has authentication on: then each person signs in with a token).")
def dashboard(target: Connection, listen: str) -> None:
    """Serve the web dashboard (live sessions, sign-in, actions, health) for a running broker.

    Each tab signs in with a broker token and acts as it; --token, if given, is
    used for tabs that have not signed in.
    """
    from broker.dashboard import DashboardServer

    async def go() -> None:
        client = target.client()
        async with DashboardServer(target.target, listen, client=client) as server:
            click.echo(f"dashboard: {server.url} (broker {target})", err=True)
            await until_signalled()
        await client.close()

    try:
        _run(go())
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


