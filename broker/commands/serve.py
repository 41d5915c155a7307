"""`broker serve`: run the service (the people commands are in `broker.commands.people`)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import click

from broker import errors, logs
from broker.commands.options import settings_from, settings_options
from broker.config import Settings
from broker.datadir import default_store_url
from broker.signals import until_signalled
from broker.store.crypto import CredentialKeyError


@click.command()
@settings_options
@click.option("--stable-after", envvar="BROKER_STABLE_AFTER", type=float, default=None,
              hidden=True, help="Deprecated and ignored: an attempt that opens resets the "
                                "backoff; see --attempt-burst / --attempt-rate.")
@click.option("--log-level", envvar="BROKER_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", envvar="BROKER_LOG_FORMAT", default="text", show_default=True,
              type=click.Choice(["text", "json"]))
def serve(**opts: Any) -> None:
    """Run the broker (defaults: a SQLite store in the data directory, the embedded
    simulator upstream)."""
    logs.setup(opts.pop("log_level"), opts.pop("log_format"))
    if opts.pop("stable_after") is not None:
        logging.getLogger("broker").warning(
            "--stable-after / BROKER_STABLE_AFTER is ignored: a connection that opens resets "
            "the backoff at once; reconnect storms are bounded by --attempt-burst and "
            "--attempt-rate")
    try:
        settings = settings_from(
            opts, store_url=opts["store_url"] or default_store_url(Path(opts["data_dir"])))
        asyncio.run(_serve(settings))
    except (CredentialKeyError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    except errors.BrokerError as exc:  # a live duplicate of --instance-id, a locked database
        raise click.ClickException(f"{exc.reason}: {exc.message}") from exc


async def _serve(settings: Settings) -> None:
    from broker import gcpolicy
    from broker.app import BrokerApp

    gcpolicy.apply(settings.gc_threshold)
    app = BrokerApp(settings)
    await app.start()
    gcpolicy.settle(settings.gc_threshold)
    click.echo(f"broker listening on {app.address}", err=True)
    if app.simulator is not None:
        click.echo(f"embedded simulator: {app.simulator.url} "
                   f"(control: {app.simulator.control_url})", err=True)
    if app.dashboard is not None:
        click.echo(f"dashboard: {app.dashboard.url}", err=True)
    if app.metrics is not None:
        click.echo(f"metrics: http://{app.metrics.address}/metrics", err=True)
    await until_signalled()
    click.echo("shutting down", err=True)
    await app.stop()

