"""`broker sim ...`: run the simulator, or drive a running one over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from broker.signals import until_signalled
from broker.simulator.control import DEFAULT_URL, SimulatorControl, SimulatorControlError
from broker.simulator.server import Simulator, SimulatorConfig

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def sim() -> None:
    """Simulated upstream network (docs/protocol.md)."""


@sim.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=50052, show_default=True, type=int)
@click.option("--idle-timeout", default=20.0, show_default=True, type=float,
              help="Seconds of client silence before closing 4408.")
@click.option("--qr-interval", default=20.0, show_default=True, type=float,
              help="Seconds each QR code stays valid.")
@click.option("--qr-max", default=5, show_default=True, type=int,
              help="QR codes shown before pairing times out.")
@click.option("--seed", default=None, type=int, help="Random seed for scheduled faults.")
@click.option("--state-file", default=None, type=click.Path(dir_okay=False),
              help="JSON file keeping paired logins and bans across restarts "
                   "(default: forget them on exit).")
def serve(
    host: str, port: int, idle_timeout: float, qr_interval: float, qr_max: int,
    seed: int | None, state_file: str | None,
) -> None:
    """Run the simulator until Ctrl-C (SIGINT) or SIGTERM."""
    config = SimulatorConfig(
        idle_timeout_s=idle_timeout, qr_interval_s=qr_interval, qr_max=qr_max, seed=seed,
        state_path=state_file,
    )
    asyncio.run(_serve(config, host, port))
    click.echo("simulator stopped")


async def _serve(config: SimulatorConfig, host: str, port: int) -> None:
    simulator = Simulator(config)
    await simulator.start(host, port)
    try:
        click.echo(f"upstream: {simulator.url}")
        click.echo(f"control:  {simulator.control_url}/control/state")
        await until_signalled()
    finally:
        await simulator.stop()


def _url_option(func: F) -> F:
    return click.option(
        "--url", envvar="BROKER_SIM_URL", default=DEFAULT_URL, show_default=True,
        help="Simulator control URL (env BROKER_SIM_URL).",
    )(func)


def _run(url: str, call: Callable[[SimulatorControl], Any]) -> None:
    try:
        result = call(SimulatorControl(url))
    except SimulatorControlError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2, sort_keys=True))


@sim.command()
@_url_option
def state(url: str) -> None:
    """Show logins, live connections and counters."""
    _run(url, lambda c: c.state())


@sim.command()
@click.argument("login")
@_url_option
def scan(login: str, url: str) -> None:
    """Scan the QR code LOGIN's pairing connection shows."""
    _run(url, lambda c: c.scan(login))


@sim.command("enter-code")
@click.argument("code")
@_url_option
def enter_code(code: str, url: str) -> None:
    """Enter the pairing CODE a session got from `broker pair` (pairs it, like a scan)."""
    _run(url, lambda c: c.enter_code(code))


@sim.command()
@click.argument("login")
@_url_option
def logout(login: str, url: str) -> None:
    """Revoke LOGIN's credentials and close its connection 4401."""
    _run(url, lambda c: c.logout(login))


@sim.command()
@click.argument("login")
@_url_option
def ban(login: str, url: str) -> None:
    """Ban LOGIN: its connection and later hellos are closed 4403."""
    _run(url, lambda c: c.ban(login))


@sim.command()
@click.argument("login")
@_url_option
def unban(login: str, url: str) -> None:
    """Lift LOGIN's ban."""
    _run(url, lambda c: c.unban(login))


@sim.command()
@click.argument("login")
@click.option("--code", default=428, show_default=True, type=int,
              help="Reason code; 428 drops without a close frame.")
@_url_option
def drop(login: str, code: int, url: str) -> None:
    """Close LOGIN's live connection with 4000+CODE."""
    _run(url, lambda c: c.drop(login, code))


@sim.command()
@click.option("--code", default=503, show_default=True, type=click.Choice(["503", "429"]))
@click.option("--count", default=1, show_default=True, type=int, help="Hellos to refuse.")
@click.option("--retry-after-ms", default=None, type=int)
@_url_option
def unavailable(code: str, count: int, retry_after_ms: int | None, url: str) -> None:
    """Refuse the next COUNT hellos (any login) with 503 or 429."""
    _run(url, lambda c: c.unavailable(int(code), count, retry_after_ms))


@sim.command()
@click.option("--drop-min-s", default=None, type=float)
@click.option("--drop-max-s", default=None, type=float)
@click.option("--latency-ms", default=None, type=float)
@click.option("--lose-acks", default=None, type=float, help="Fraction of acks lost (0..1).")
@click.option("--drop-media", default=None, type=click.IntRange(0),
              help="Drop the connection on the next N sends carrying a medium (mid-upload).")
@_url_option
def faults(
    drop_min_s: float | None, drop_max_s: float | None, latency_ms: float | None,
    lose_acks: float | None, drop_media: int | None, url: str,
) -> None:
    """Set scheduled faults; options left out switch that fault off."""
    _run(url, lambda c: c.faults(drop_min_s=drop_min_s, drop_max_s=drop_max_s,
                                 latency_ms=latency_ms, lose_acks=lose_acks,
                                 drop_media=drop_media))


@sim.command()
@click.argument("login")
@click.argument("body")
@click.option("--from", "sender", default="15550001111", show_default=True)
@_url_option
def inbound(login: str, body: str, sender: str, url: str) -> None:
    """Deliver an inbound message BODY to LOGIN."""
    _run(url, lambda c: c.inbound(login, sender, body))


@sim.command()
@click.argument("login")
@_url_option
def record(login: str, url: str) -> None:
    """Show every message accepted for LOGIN, with counters."""
    _run(url, lambda c: c.record(login))


@sim.command()
@_url_option
def reset(url: str) -> None:
    """Forget every login, record and fault."""
    _run(url, lambda c: c.reset())
