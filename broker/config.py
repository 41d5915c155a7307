"""Settings of one broker process; every field has a CLI flag and a BROKER_* variable."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.lifecycle.policy import LifecyclePolicy


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    upstream_url: str | None = None
    """None: start the embedded simulator and connect to it."""
    simulator_host: str = "127.0.0.1"
    simulator_port: int = 50052
    store_url: str = "memory://"
    """`memory://`, `sqlite:///path/to/broker.db`, `redis://host:port/db`,
    `redis+cluster://host:port[,host:port...]` or
    `redis+sentinel://host:port[,host:port...]/service_name[/db]`. A BrokerApp
    built in code keeps the in-memory default; `broker serve` without `--store` uses
    the SQLite database in its data directory (broker.datadir)."""
    data_dir: str | None = None
    """Where the embedded simulator keeps its logins (`broker serve`: its data
    directory, beside the default database); None: the simulator keeps no state."""
    lifecycle: LifecyclePolicy = field(default_factory=LifecyclePolicy)
    connect_timeout_s: float = 10.0
    max_body_bytes: int = 64 * 1024
    max_outbox: int = 10_000
    send_window: int = 64
    """Messages in flight to the upstream per session before waiting for acks."""
    ack_timeout_s: float = 5.0
    """Resend an unacked message after this long (the upstream de-duplicates)."""
    write_linger_s: float = 0.001
    """Under load, how long a session's next outbox write waits to gather more Sends
    and acks; a lone Send never waits. Fewer, larger writes mean less event-loop,
    syscall and Redis work per message. 1 ms, not 5: at 16 Sends in flight each
    Send waits out the linger twice (its write, its ack's), and 5 ms halved the
    throughput there while adding little at 64 (docs/benchmarks.md)."""
    default_send_timeout_s: float = 30.0
    """How long Send waits for the ack when the caller set no deadline."""
    max_send_timeout_s: float = 3600.0
    """Deadlines longer than this are rejected as INVALID_ARGUMENT."""
    subscriber_buffer: int = 1000
    event_log_size: int = 10_000
    health_interval_s: float = 10.0
    instance_id: str = ""
    """Name of this instance among several (default: host-pid-random)."""
    lease_ttl_s: float = 10.0
    """Ownership lease TTL with Redis; a dead instance's sessions move after about this."""
    key_prefix: str = "broker"
    """Prefix of every Redis key (several deployments can share one Redis)."""
    durability: str = "local"
    """Redis: when a Send counts as accepted. `local`: written on the primary (as safe as
    its append-only file); `replica`: also confirmed by a replica (WAIT / WAITAOF), so
    a failover loses nothing accepted."""
    inbound_redeliver_after_s: float = 30.0
    """Hand an unacked inbound message to another worker of its group after this long."""
    inbound_retention_s: float = 7 * 86400.0
    """Keep inbound messages (and their de-dup entries) this long, acked or not; 0:
    for ever. Without a bound, a session's inbound stream grows for as long as it lives."""
    dashboard_listen: str | None = None
    """Serve the web dashboard on this host:port (None: off; it has no authentication)."""
    auth_tokens_file: str | None = None
    """JSON token file (`broker token create`); None: no authentication, loopback only."""
    tls_cert_file: str | None = None
    """PEM server certificate (chain); with tls_key_file the gRPC port speaks TLS."""
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    """PEM CA that client certificates must chain to (mutual TLS); None: no client certs."""
    rate_limit: float = 0.0
    """Messages per second each session accepts (token bucket; 0: no limit)."""
    rate_burst: int = 0
    """Bucket size: messages accepted at once after a quiet spell (0: one second's worth)."""
    metrics_listen: str | None = None
    """Serve Prometheus metrics at http://host:port/metrics (None: off)."""
    webhooks_file: str | None = None
    """JSON file tenant -> {url, secret} ("*": default); None: no webhook notifications."""
    webhook_max_attempts: int = 12
    """Attempts per notification before giving up."""
    webhook_max_time_s: float = 900.0
    """Stop retrying a notification after this long."""
    webhook_backoff_initial_s: float = 0.5
    """First retry waits up to this (full jitter), doubling up to webhook_backoff_max_s."""
    webhook_backoff_max_s: float = 60.0
    webhook_timeout_s: float = 5.0
    """Timeout of one webhook HTTP request."""
