"""Settings of one broker process. Each field carries its flag (`broker.flags`):
`broker serve` builds one option per field from it, so defaults and help live here
only; every flag also reads its BROKER_* variable."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.flags import setting
from broker.lifecycle.policy import LifecyclePolicy


@dataclass(frozen=True)
class Settings:
    listen: str = setting("127.0.0.1:50051", "gRPC listen address.")
    upstream_url: str | None = setting(
        None, "Protocol-v1 upstream websocket URL (--engine ws, the default engine with it).",
        show_default=False)
    engine: str | None = setting(
        None, "What sessions run on: sim (the embedded simulator), ws (the protocol-v1 "
              "upstream at --upstream-url) or baileys (real WhatsApp through the Node.js "
              "bridge).",
        choices=("sim", "ws", "baileys"), show_default="sim, or ws with --upstream-url")
    """None: ws with an upstream URL, else sim (broker.engines.resolve fills it in)."""
    wa_version: str | None = setting(
        None, "baileys: WhatsApp Web version to announce, e.g. 2.3000.1023223821; pin it "
              "when WhatsApp rejects the client as outdated (405).", show_default=False)
    """None: the bridge's default."""
    baileys_ws_url: str | None = setting(
        None, "baileys: WhatsApp websocket URL (Baileys' waWebSocketUrl), for tests and "
              "proxies only.", show_default=False)
    """None: WhatsApp's own."""
    simulator_host: str = setting("127.0.0.1", "Host the embedded simulator listens on.",
                                  name="--sim-host")
    simulator_port: int = setting(
        50052, "Port of the embedded simulator (websocket + /control).", name="--sim-port")
    store_url: str = setting(
        "memory://",
        "Store URL: sqlite:///path/to/broker.db (one process), memory:// (tests, demos: "
        "forgets everything on exit) or redis://host:port/db (several instances); "
        "redis+cluster://host:port[,host:port...] (Redis Cluster), "
        "redis+sentinel://host:port[,host:port...]/service_name[/db] (Sentinel).",
        name="--store", cli_default=lambda: None,
        show_default="sqlite:///<data dir>/broker.db")
    """A BrokerApp built in code keeps memory://; `broker serve` without `--store`
    uses the SQLite database in its data directory (broker.datadir)."""
    data_dir: str | None = setting(
        None, "Where the default SQLite database, its credential key file and the embedded "
              "simulator's logins live (created on first start).",
        path="dir", cli_default=lambda: _default_data_dir())
    """None (a BrokerApp built in code): the embedded simulator keeps no state."""
    lifecycle: LifecyclePolicy = field(default_factory=LifecyclePolicy)
    """Its fields are flags of their own (broker.lifecycle.policy)."""
    connect_timeout_s: float = setting(10.0, "Upstream connect and handshake timeout, seconds.")
    max_body_bytes: int = setting(64 * 1024, "Largest message body accepted.")
    max_media_bytes: int = setting(
        16 * 1024 * 1024, "Largest medium (image, video, audio, document, sticker) a Send may "
                          "carry; the gRPC message size limit is raised to fit it.",
        minimum=1, maximum=64 * 1024 * 1024)
    presence_rate: float = setting(
        2.0, "SendPresence calls per second per session (bursts of 5); 0: no limit.",
        minimum=0)
    max_outbox: int = setting(10_000, "Undelivered messages per session before OUTBOX_FULL.")
    send_window: int = setting(
        64, "Messages in flight to the upstream per session before waiting for acks.")
    ack_timeout_s: float = setting(
        5.0, "Resend an unacked message after this long, seconds (the upstream de-duplicates).")
    write_linger_s: float = setting(
        0.001, "Under load, seconds a session's next outbox write waits to gather more Sends "
               "and acks (0: never); a lone Send never waits, nor a write with 16 queued, "
               "nor one of only acks or a many-Sends request's messages.",
        minimum=0, maximum=1)
    """Fewer, larger writes mean less event-loop, syscall and Redis work per message;
    why 1 ms is the default: docs/benchmarks.md."""
    gc_threshold: int = setting(
        20_000, "Allocations between the process's young garbage collections (Python's "
                "default: 700); 0: Python's defaults.", minimum=0)
    """Why: broker.gcpolicy."""
    max_pending_calls: int = setting(
        10_000, "Calls gRPC holds for the broker while its loop is busy; past it gRPC "
                "itself refuses new calls at random (CANCELLED), past 3x every one "
                "(gRPC's default: 1000).", minimum=1)
    """gRPC core cancels a new call at random once more than this many wait for the
    application to take them: a busy loop with 1,024 Sends in flight lost dozens a
    run to a bare CANCELLED that no client retries. Waiting calls cost little; the
    broker's own limits (send window, outbox depth, rate limits) refuse with reasons."""
    default_send_timeout_s: float = setting(
        30.0, "Ack wait for Send calls without a deadline, seconds.", name="--send-timeout")
    max_send_timeout_s: float = setting(
        3600.0, "Send deadlines longer than this are INVALID_ARGUMENT, seconds.")
    subscriber_buffer: int = setting(
        1000, "Status events buffered per StreamStatus subscriber before it must resync.")
    event_log_size: int = setting(
        10_000, "Status events kept in the log that StreamStatus resumes from.")
    health_interval_s: float = setting(
        10.0, "How often each session's health is re-evaluated, seconds.")
    instance_id: str = setting(
        "", "Name of this instance among several (default: host-pid-random).",
        show_default=False)
    lease_ttl_s: float = setting(
        10.0, "Session ownership lease TTL with Redis, seconds; a dead instance's sessions "
              "move after about this.")
    key_prefix: str = setting(
        "broker", "Prefix of every Redis key (several deployments can share one Redis).")
    sent_retention_s: float = setting(
        86400.0, "Seconds a sent message is kept after its ack: for Send retries with the "
                 "same idempotency key and WhatsApp's retry requests (baileys).",
        minimum=0)
    """SQLite and Redis; the memory store keeps the newest 100,000 per session."""
    durability: str = setting(
        "local", "Redis: a Send is accepted once the primary has it (local) or once a replica "
                 "confirmed it too (replica: WAIT / WAITAOF; a failover loses nothing "
                 "accepted).", choices=("local", "replica"))
    """`local`: written on the primary (as safe as its append-only file)."""
    inbound_redeliver_after_s: float = setting(
        30.0, "Hand an unacked inbound message to another worker of its group after, seconds.")
    inbound_retention_s: float = setting(
        7 * 86400.0, "Seconds an inbound message (and its de-duplication entry) is kept for "
                     "worker groups, acked or not (0: for ever).",
        minimum=0)
    dashboard_listen: str | None = setting(
        None, "Serve the web dashboard on host:port, e.g. 127.0.0.1:8080 (default: off; with "
              "--auth-tokens people sign in with a token, without it loopback only).",
        zero_is_none=True)
    auth_tokens_file: str | None = setting(
        None, "Token file from `broker token create` (unset: no auth, loopback only).")
    tls_cert_file: str | None = setting(
        None, "PEM server certificate chain (with --tls-key: serve TLS).")
    tls_key_file: str | None = setting(None, "PEM server private key.")
    tls_client_ca_file: str | None = setting(
        None, "PEM CA that client certificates must chain to (mutual TLS).")
    rate_limit: float | None = setting(
        None, "Messages per second per session (0: no limit).", minimum=0,
        show_default="0, on --engine baileys 1")
    """None: the engine's default (broker.engines.BAILEYS_RATE_LIMIT on baileys)."""
    rate_burst: int = setting(0, "Messages at once after a quiet spell (0: one second's).",
                              show_default="0, on --engine baileys 5")
    metrics_listen: str | None = setting(
        None, "Serve Prometheus metrics at http://host:port/metrics, e.g. 127.0.0.1:9464 "
              "(default: off).", zero_is_none=True)
    webhooks_file: str | None = setting(
        None, "JSON file tenant -> {url, secret} ('*': default) for notifications when a "
              "session needs a person (default: none).",
        path="existing-file")
    webhook_max_attempts: int = setting(12, "Attempts per webhook notification.")
    webhook_max_time_s: float = setting(
        900.0, "Stop retrying a webhook notification after, seconds.")
    webhook_backoff_initial_s: float = setting(
        0.5, "First webhook retry waits up to this (full jitter), doubling, seconds.")
    webhook_backoff_max_s: float = setting(60.0, "Webhook retry wait cap, seconds.")
    webhook_timeout_s: float = setting(5.0, "Timeout of one webhook HTTP request, seconds.")


def _default_data_dir() -> str:
    from broker.datadir import default_data_dir

    return str(default_data_dir())
