"""`broker serve`: run the service (the people commands are in `broker.commands.people`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

import click

from broker import errors, logs
from broker.config import Settings
from broker.datadir import DATA_DIR_ENV, default_data_dir, default_store_url
from broker.lifecycle.policy import LifecyclePolicy
from broker.store.crypto import CredentialKeyError

_S = Settings()
_P = LifecyclePolicy()
"""Flag defaults come from the settings' own defaults: one source of truth."""


async def until_signalled() -> None:
    """Return on SIGINT or SIGTERM: what a long-running command serves until."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@click.command()
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
                   "instances); redis+cluster://host:port[,host:port...] (Redis Cluster), "
                   "redis+sentinel://host:port[,host:port...]/service_name[/db] (Sentinel).")
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
@click.option("--durability", envvar="BROKER_DURABILITY", default=_S.durability,
              type=click.Choice(["local", "replica"]), show_default=True,
              help="Redis: a Send is accepted once the primary has it (local) or once a "
                   "replica confirmed it too (replica: WAIT, WAITAOF on Redis 7.2+).")
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
        durability=opts["durability"],
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
    await until_signalled()
    click.echo("shutting down", err=True)
    await app.stop()

