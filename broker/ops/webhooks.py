"""Webhook notifications for session states that need a person.

A session that waits for a QR scan (PAIRING), was logged out, is replaced by
an outside client (CONFLICT) or gave up (FAILED) will not fix itself, and
nobody watches dashboards at 3 a.m. The owning instance POSTs a signed JSON
notification to the tenant's URL and retries with backoff until the receiver
answers 2xx or the configured attempts / time run out: at least once, so a
receiver de-duplicates by `event_id`.

Signature: `X-Broker-Signature: sha256=<hex>` is HMAC-SHA256 with the
tenant's secret over `<X-Broker-Timestamp>.<raw body>`; the timestamp (unix
seconds of this attempt) lets a receiver reject replays.

Posts go through one aiohttp ClientSession per notifier (connections to a
receiver are reused across notifications), each attempt bounded by
`--webhook-timeout`; redirects are not followed (they would turn the POST
into a bodiless GET, or send the signed body to a URL nobody configured), so a
3xx counts as a failed attempt.

Pending notifications live in memory: a process killed mid-retry drops them
(the state itself is in the store and `Health`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from broker.config import Settings
from broker.lifecycle.health import SessionStats, recommend
from broker.lifecycle.states import State
from broker.ops import BusFollower
from broker.runtime.manager import SessionManager
from broker.store.base import StatusEvent

log = logging.getLogger(__name__)

#: The states that need a person, and the notification type each one sends.
EVENT_TYPES: dict[State, str] = {
    State.PAIRING: "session.pairing_required",
    State.LOGGED_OUT: "session.logged_out",
    State.CONFLICT: "session.conflict",
    State.FAILED: "session.failed",
}
DEFAULT_TARGET = "*"
USER_AGENT = "session-broker-webhooks/1"


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    secret: str = field(repr=False)
    """Never logged, never in a repr."""

    @property
    def safe_url(self) -> str:
        """Scheme, host and port only: webhook URLs often embed a token in the path."""
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}"


@dataclass(frozen=True)
class WebhookPolicy:
    """How hard to try: attempts and total time both bound the retries."""

    max_attempts: int = 12
    max_time_s: float = 900.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        return cls(max_attempts=settings.webhook_max_attempts,
                   max_time_s=settings.webhook_max_time_s,
                   backoff_initial_s=settings.webhook_backoff_initial_s,
                   backoff_max_s=settings.webhook_backoff_max_s,
                   timeout_s=settings.webhook_timeout_s)


class DeliveryFailed(Exception):
    """The receiver answered non-2xx or could not be reached (retried)."""


def parse_targets(raw: Mapping[str, Any]) -> dict[str, WebhookTarget]:
    """tenant -> {"url", "secret"}; "*" is the default for tenants not listed."""
    if not isinstance(raw, Mapping):
        raise ValueError("webhooks config must be a JSON object: tenant -> {url, secret}")
    targets: dict[str, WebhookTarget] = {}
    for tenant, entry in raw.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"webhooks[{tenant!r}] must be an object with url and secret")
        url, secret = entry.get("url"), entry.get("secret")
        if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"webhooks[{tenant!r}].url must be an http(s) URL")
        if not isinstance(secret, str) or not secret:
            raise ValueError(f"webhooks[{tenant!r}].secret must be a non-empty string")
        targets[str(tenant)] = WebhookTarget(url, secret)
    return targets


def load_targets(path: str) -> dict[str, WebhookTarget]:
    """Read the `--webhooks` JSON file (errors name the file, never a secret)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"webhooks file {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    try:
        return parse_targets(raw)
    except ValueError as exc:
        raise ValueError(f"webhooks file {path}: {exc}") from None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Broker-Signature value for one attempt."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does (constant-time); also used by the tests."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def payload(event: StatusEvent) -> dict[str, Any]:
    """The notification body for a status event that needs a person."""
    advice = recommend(event.state, SessionStats(), now=event.at, outbox_depth=0,
                       reason=event.reason, code=event.code, session_id=event.session_id)
    return {
        "type": EVENT_TYPES[event.state],
        "event_id": event.event_id,
        "session_id": event.session_id,
        "tenant": event.tenant,
        "state": event.state.value,
        "previous_state": event.previous.value,
        "reason": event.reason,
        "code": event.code,
        "timestamp": datetime.fromtimestamp(event.at, UTC).isoformat().replace("+00:00", "Z"),
        "recommendation": advice[0].message if advice else "",
    }


class WebhookNotifier:
    """Follows the status bus and notifies for owned sessions that need a person."""

    def __init__(self, manager: SessionManager, targets: Mapping[str, WebhookTarget],
                 policy: WebhookPolicy | None = None) -> None:
        self.manager = manager
        self.targets = dict(targets)
        self.policy = policy or WebhookPolicy()
        self.observed = 0
        """Status events seen (every instance sees every session's with Redis)."""
        self.scheduled = 0
        """Notifications this instance took on (owned sessions only)."""
        self.delivered = 0
        self.given_up = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._follower = BusFollower(manager.bus, self.observe, "webhooks")
        self._http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        """Start following the bus; call from the running loop (the HTTP session binds it)."""
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.policy.timeout_s),
            headers={"User-Agent": USER_AGENT},
        )
        self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()
        if self._tasks:
            log.warning("dropping %d webhook notifications still being retried", len(self._tasks))
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def target_for(self, tenant: str) -> WebhookTarget | None:
        return self.targets.get(tenant) or self.targets.get(DEFAULT_TARGET)

    def observe(self, event: StatusEvent) -> None:
        # Only entering a state counts (a PAIRING QR refresh is PAIRING -> PAIRING),
        # and only the owner notifies: with Redis every instance sees every event.
        self.observed += 1
        if event.state not in EVENT_TYPES or event.state == event.previous:
            return
        if event.session_id not in self.manager.actors:
            return
        target = self.target_for(event.tenant)
        if target is None:
            return
        self.scheduled += 1
        task = asyncio.create_task(self._notify(target, event),
                                   name=f"webhook:{event.session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self, target: WebhookTarget, event: StatusEvent) -> None:
        extra = {"session_id": event.session_id, "tenant": event.tenant}
        body = json.dumps(payload(event), separators=(",", ":")).encode()
        p = self.policy

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning("session %s: webhook %s to %s failed (attempt %d: %s); retrying in "
                        "%.1fs", event.session_id, EVENT_TYPES[event.state], target.safe_url,
                        state.attempt_number, error, wait, extra=extra)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, p.max_attempts)) | stop_after_delay(p.max_time_s),
            wait=wait_random_exponential(multiplier=p.backoff_initial_s, max=p.backoff_max_s),
            retry=retry_if_exception_type((DeliveryFailed, OSError)),
            before_sleep=before_sleep, reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post(target, body, event.event_id)
        except (DeliveryFailed, OSError) as exc:
            self.given_up += 1
            log.error("session %s: webhook %s to %s not delivered, giving up: %s",
                      event.session_id, EVENT_TYPES[event.state], target.safe_url, exc,
                      extra=extra)
            return
        self.delivered += 1
        log.info("session %s: webhook %s delivered to %s", event.session_id,
                 EVENT_TYPES[event.state], target.safe_url, extra=extra)

    async def _post(self, target: WebhookTarget, body: bytes, event_id: str) -> None:
        """One attempt; raises DeliveryFailed unless the receiver answers 2xx."""
        if self._http is None:
            raise DeliveryFailed("notifier stopped")
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Broker-Timestamp": timestamp,
            "X-Broker-Signature": sign(target.secret, timestamp, body),
            "X-Broker-Event-Id": event_id,
        }
        try:
            async with self._http.post(target.url, data=body, headers=headers,
                                       allow_redirects=False) as response:
                status = response.status
                await response.read()  # drain, so the connection can be reused
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self.policy.timeout_s}s") from None
        except aiohttp.ClientError as exc:
            raise DeliveryFailed(f"unreachable: {exc}") from None
        if not 200 <= status < 300:
            raise DeliveryFailed(f"HTTP {status}")
