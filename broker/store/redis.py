"""The Redis store: state that survives broker restarts and is shared by instances.

Behaves like `MemoryStore` (the reference); what differs is where things live.

Key layout (``P`` = key prefix, default ``broker``; ``T`` = ``{s:<session_id>}``,
the hash tag shared by every key of one session, so one Lua script can touch
them together and the layout holds on Redis Cluster):

- ``P:T:session``       hash: tenant, enabled, created_at
- ``P:T:creds``         string: AES-GCM sealed credentials (see `broker.store.crypto`)
- ``P:T:outbox``        stream: unacked messages in FIFO order (acked ones are XDEL'd)
- ``P:T:ids``           hash: message id -> outbox stream entry id (unacked only)
- ``P:T:seq``           counter: the outbox sequence
- ``P:T:idem:<key>``    string: the message accepted under an idempotency key;
                        no TTL while unacked, the idempotency TTL once acked
- ``P:T:result:<mid>``  string: ack time of a delivered message (idempotency TTL)
- ``P:T:last``          hash: the session's last status event (``id``, ``event``)
- ``P:T:fence``         string: the current fencing token (see `broker.store.redis_fencing`);
                        kept, and raised, when the session is deleted
- ``P:T:lease``         string: "<instance>:<token>" of the owning instance (broker.cluster.lease)
- ``P:T:live``          hash: the owner's live report, expiring with the lease TTL
- ``P:T:acked``         pub/sub channel: "<mid> <acked_at>" on every ack
- ``P:T:inbound``       stream: inbound messages; consumer groups are the worker groups
- ``P:T:inbound:seen``  hash: upstream message id -> inbound stream entry id (de-dup)
- ``P:T:inbound:aged``  sorted set: upstream message id by arrival (ms), to trim
                        the de-dup hash with the stream past the inbound retention
- ``P:sessions``        set of all session ids; ``P:tenant:<tenant>`` one per tenant
- ``P:events``          stream: the global status event log, ``MAXLEN ~ event_log_size``;
                        its entry ids are the event ids

Ownership of a session is a lease (DESIGN section 5). The owner reads the
outbox through the ``owners`` consumer group under its instance's consumer
name; an ack is an XACK plus XDEL. Every owner write is a script that first
checks the writer's fencing token against ``P:T:fence``, so a former owner's
late writes are refused (NotOwner), and every read for delivery first takes
over whatever other consumers (former owners) read and never acked.

The status event append writes the global log and the session's ``last`` hash
in one script, which ties two slots together: on Redis Cluster it needs its
own split (not supported yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from broker.errors import BrokerError, NotOwner, OutboxFull, StoreUnavailable
from broker.lifecycle.states import State
from broker.store.base import (
    Accepted,
    DeliveryResult,
    EventPage,
    InboundDelivery,
    InboundRecord,
    LiveState,
    OneAtATime,
    OutboxBatch,
    OutboxBatchResult,
    OutboxMessage,
    SessionRecord,
    StatusEvent,
    event_order,
)
from broker.store.crypto import HOW_TO_SET_KEY, CredentialCipher, CredentialKeyError
from broker.store.redis_fencing import FENCED, FENCED_REPLY, NEXT_TOKEN, fence_arg
from broker.store.redis_keys import RedisKeys

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_BLOCK_CHUNK_S = 2.0
"""Longest single blocking call: well under the socket timeout, so a wait never
looks like a dead connection."""
_MAX_ID_PART = 2**64 - 1
OUTBOX_GROUP = "owners"
"""The consumer group the session's owner reads its outbox through."""
_UNAVAILABLE_REPLIES = ("MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING")

# KEYS: outbox stream, ids hash, seq counter, fence
# ARGV: at, max_depth, idem key prefix, result key prefix, ttl_ms, ack channel, group,
#       consumer, claim (0/1), number of acks, fencing token ('' unfenced), the acked
#       message ids, then per new message: message_id, to, body, idempotency_key
# Returns {acked, accepted, claimed, unread}: per ack its result time; per new message
# {'new', record}, {'dup', record, result or false} or {'full', depth}; with claim, the
# field lists of the entries read for the caller, and 1 if unread entries remain.
# Idem and result keys are built from prefixes that carry the session's hash tag (the
# idem key is named in the outbox entry), so they share the declared keys' slot.
_APPLY_OUTBOX = FENCED + """
if fenced(KEYS[4], ARGV[11]) then return refuse(ARGV[11]) end
local at, ttl = ARGV[1], ARGV[5]
if ARGV[9] == '1' then  -- the read below must not fail after the writes: no rollback
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[7], '0', 'MKSTREAM')
end
local acked = {}
local n_acks = tonumber(ARGV[10])
for n = 12, 11 + n_acks do
  local mid = ARGV[n]
  local result_key = ARGV[4] .. mid
  local done = redis.call('GET', result_key)
  if done then
    acked[#acked + 1] = done
  else
    local entry = redis.call('HGET', KEYS[2], mid)
    if entry then
      local rows = redis.call('XRANGE', KEYS[1], entry, entry)
      if rows[1] then
        local f = rows[1][2]
        for i = 1, #f, 2 do
          if f[i] == 'key' then redis.call('PEXPIRE', ARGV[3] .. f[i + 1], ttl) end
        end
      end
      redis.call('XACK', KEYS[1], ARGV[7], entry)
      redis.call('XDEL', KEYS[1], entry)
      redis.call('HDEL', KEYS[2], mid)
      redis.call('SET', result_key, at, 'PX', ttl)
      redis.call('PUBLISH', ARGV[6], mid .. ' ' .. at)
    end
    acked[#acked + 1] = at
  end
end
local accepted, fresh, last_added = {}, 0, nil
local depth = redis.call('XLEN', KEYS[1])
local max_depth = tonumber(ARGV[2])
for n = 12 + n_acks, #ARGV, 4 do
  local mid, to, body, key = ARGV[n], ARGV[n + 1], ARGV[n + 2], ARGV[n + 3]
  local idem = ARGV[3] .. key
  local known = redis.call('GET', idem)
  if known then
    local known_mid = cjson.decode(known)[1]
    accepted[#accepted + 1] = {'dup', known, redis.call('GET', ARGV[4] .. known_mid)}
  elseif depth >= max_depth then
    accepted[#accepted + 1] = {'full', tostring(depth)}
  else
    local seq = tostring(redis.call('INCR', KEYS[3]))
    last_added = redis.call('XADD', KEYS[1], '*', 'mid', mid, 'to', to, 'body', body,
      'key', key, 'seq', seq, 'at', at)
    redis.call('HSET', KEYS[2], mid, last_added)
    local record = cjson.encode({mid, to, body, seq, at})
    redis.call('SET', idem, record)
    depth, fresh = depth + 1, fresh + 1
    accepted[#accepted + 1] = {'new', record}
  end
end
local claimed, unread = {}, 0
if ARGV[9] == '1' and fresh > 0 then
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[7], ARGV[8], 'COUNT', fresh,
    'STREAMS', KEYS[1], '>')
  local last_read = nil
  if reply then
    for _, row in ipairs(reply[1][2]) do
      last_read = row[1]
      if row[2] then claimed[#claimed + 1] = row[2] end
    end
  end
  if last_read ~= last_added then unread = 1 end
end
return {acked, accepted, claimed, unread}
"""

# KEYS: outbox stream, fence.  ARGV: group, consumer
# Moves every entry other consumers (former owners) read and never acked to this
# consumer, in bounded steps; returns how many this consumer now holds unacked.
_TAKE_OVER = """
local function take_over(key, group, consumer)
  local summary = redis.call('XPENDING', key, group)
  local others = false
  for _, row in ipairs(summary[4] or {}) do
    if row[1] ~= consumer then others = true end
  end
  if others then
    local cursor = '0-0'
    for _ = 1, 100 do
      local reply = redis.call('XAUTOCLAIM', key, group, consumer, 0, cursor, 'COUNT', 1000,
        'JUSTID')
      cursor = reply[1]
      if cursor == '0-0' then break end
    end
  end
  for _, row in ipairs(redis.call('XPENDING', key, group)[4] or {}) do
    if row[1] == consumer then return tonumber(row[2]) end
  end
  return 0
end
"""
_CLAIM_OUTBOX = FENCED + _TAKE_OVER + """
if fenced(KEYS[2], ARGV[3]) then return refuse(ARGV[3]) end
return take_over(KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: outbox stream, fence.  ARGV: group, consumer, limit, after_sequence, token
# Former owners' unacked entries are taken over first, then the owner's own pending
# list (older than anything new), then new entries; of that window only the messages
# numbered after `after_sequence` are returned, so a delivery loop with the rest in
# flight does not read their bodies again.
_PENDING = FENCED + _TAKE_OVER + """
if fenced(KEYS[2], ARGV[5]) then return refuse(ARGV[5]) end
take_over(KEYS[1], ARGV[1], ARGV[2])
local limit, after = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, seen = {}, 0
local function take(reply)
  if not reply then return end
  for _, row in ipairs(reply[1][2]) do
    local f = row[2]
    if f then  -- false: deleted after it was read, so already acked
      seen = seen + 1
      for i = 1, #f, 2 do
        if f[i] == 'seq' and tonumber(f[i + 1]) > after then out[#out + 1] = f end
      end
    end
  end
end
take(redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', limit, 'STREAMS', KEYS[1], '0'))
if seen < limit then
  take(redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', limit - seen,
    'STREAMS', KEYS[1], '>'))
end
return out
"""

# KEYS: session hash.  ARGV: tenant, enabled, created_at
_CREATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'enabled', ARGV[2], 'created_at', ARGV[3])
return false
"""

# KEYS: session hash.  ARGV: enabled
_SET_ENABLED = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'enabled', ARGV[1]) end
return 0
"""

# KEYS: event log, last-event hash, fence.  ARGV: token, event json, log size, ttl_ms (0: none)
# The log entry and the session's last event are written together, fenced: a former
# owner's late event can neither enter the log nor replace its successor's state.
_APPEND_EVENT = FENCED + """
if fenced(KEYS[3], ARGV[1]) then return refuse(ARGV[1]) end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[2])
redis.call('HSET', KEYS[2], 'id', id, 'event', ARGV[2])
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return id
"""

# KEYS: live hash, fence.  ARGV: token, ttl_ms, then field/value pairs
_REPORT_LIVE = FENCED + """
if fenced(KEYS[2], ARGV[1]) then return refuse(ARGV[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: credentials, fence.  ARGV: token, sealed credentials ('' and no 3rd arg: delete)
_SET_CREDENTIALS = FENCED + """
if fenced(KEYS[2], ARGV[1]) then return refuse(ARGV[1]) end
if ARGV[2] then redis.call('SET', KEYS[1], ARGV[2]) else redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: fence.  Grants the next token (see broker.store.redis_fencing).
_NEW_FENCE = NEXT_TOKEN + """
return next_token(KEYS[1])
"""

# KEYS: inbound stream, seen hash, aged sorted set, fence.
# ARGV: upstream id, sender, body, at, retention (ms; 0: keep everything), token
# Ages come from the stream's entry ids, Redis's clock, whoever's broker adds.
_ADD_INBOUND = FENCED + """
if fenced(KEYS[4], ARGV[6]) then return refuse(ARGV[6]) end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return false end
local entry = redis.call('XADD', KEYS[1], '*', 'uid', ARGV[1], 'from', ARGV[2], 'body', ARGV[3],
  'at', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], entry)
local retention = tonumber(ARGV[5])
if retention > 0 then
  local now = tonumber(string.match(entry, '^(%d+)'))
  local cutoff = now - retention
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  redis.call('XTRIM', KEYS[1], 'MINID', cutoff)
  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. cutoff, 'LIMIT', 0, 256)
  if #old > 0 then
    redis.call('HDEL', KEYS[2], unpack(old))
    redis.call('ZREM', KEYS[3], unpack(old))
  end
end
return entry
"""
_MAX_CLAIM_ROUNDS = 10
"""XAUTOCLAIM scans a bounded slice of the pending list per call; this many calls
bound one read's claiming."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _event_to_json(event: StatusEvent) -> str:
    return json.dumps(asdict(event), separators=(",", ":"))


def _event_from_json(raw: bytes | str, event_id: str | None = None) -> StatusEvent:
    data = json.loads(raw)
    data["state"] = State(data["state"])
    data["previous"] = State(data["previous"])
    if event_id is not None:
        data["event_id"] = event_id
    return StatusEvent(**data)


def _guard(
    fn: Callable[Concatenate[RedisStore, P], Awaitable[R]],
) -> Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, R]]:
    """Turn Redis connection trouble into StoreUnavailable, in one place."""

    async def wrapper(self: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except BrokerError:
            raise
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from exc
        except (rexc.ReadOnlyError, rexc.OutOfMemoryError) as exc:
            raise self._unavailable(exc) from exc
        except rexc.ResponseError as exc:
            if str(exc).startswith(_UNAVAILABLE_REPLIES):
                raise self._unavailable(exc) from exc
            if str(exc).startswith(FENCED_REPLY):
                raise NotOwner(f"refused a stale owner's write: {exc}") from exc
            raise

    functools.update_wrapper(wrapper, fn)
    return wrapper


@dataclass(eq=False)
class _Waiter:
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    result: DeliveryResult | None = None


@dataclass(eq=False)
class _Channel:
    waiters: dict[str, set[_Waiter]] = field(default_factory=dict)
    subscribed: bool = False
    unconfirmed: int = 0
    """SUBSCRIBE commands sent whose confirmation has not come back yet."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class _AckListener:
    """One pub/sub connection per store, shared by every `wait_result` call.

    A waiter subscribes to its session's ack channel and waits for the
    subscription to be confirmed before it checks the stored result, so an
    ack is either already stored or is published to it: nothing slips
    between. Pub/sub is at-most-once across a reconnect, so after one every
    waiter re-checks, and each also re-checks every `recheck_s` as a last
    safety net.
    """

    def __init__(self, client: aioredis.Redis, control_channel: str, recheck_s: float) -> None:
        self._client = client
        self._control = control_channel
        self._recheck_s = recheck_s
        self._channels: dict[str, _Channel] = {}
        self._pubsub: PubSub | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def wait(
        self, channel: str, message_id: str, timeout: float,
        check: Callable[[], Awaitable[DeliveryResult | None]],
    ) -> DeliveryResult | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ch = self._channels.setdefault(channel, _Channel())
        waiter = _Waiter()
        ch.waiters.setdefault(message_id, set()).add(waiter)
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run())
            await self._subscribe(channel, ch)
            while True:
                waiter.poke.clear()
                remaining = deadline - loop.time()
                if not ch.ready.is_set() and remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ch.ready.wait(), min(remaining, self._recheck_s))
                if waiter.result is not None:
                    return waiter.result
                found = await check()
                if found is not None:
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.poke.wait(), min(remaining, self._recheck_s))
                if waiter.result is not None:
                    return waiter.result
        finally:
            waiters = ch.waiters.get(message_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del ch.waiters[message_id]
            if not ch.waiters:
                self._spawn_unsubscribe(channel)

    async def _subscribe(self, channel: str, ch: _Channel) -> None:
        async with self._lock:
            if self._pubsub is None or ch.subscribed:
                return  # the listener (re)subscribes every channel when it connects
            ch.subscribed = True
            ch.unconfirmed += 1
            ch.ready.clear()
            await self._pubsub.subscribe(channel)

    def _spawn_unsubscribe(self, channel: str) -> None:
        task = asyncio.ensure_future(self._unsubscribe(channel))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _unsubscribe(self, channel: str) -> None:
        async with self._lock:
            ch = self._channels.get(channel)
            if ch is None or ch.waiters:
                return
            del self._channels[channel]
            if ch.subscribed and self._pubsub is not None:
                with contextlib.suppress(rexc.RedisError, OSError):
                    await self._pubsub.unsubscribe(channel)

    async def _connect(self) -> PubSub:
        async with self._lock:
            pubsub = self._client.pubsub()
            channels = list(self._channels)
            for name in channels:
                ch = self._channels[name]
                ch.subscribed, ch.unconfirmed = True, 1
                ch.ready.clear()
            await pubsub.subscribe(self._control, *channels)
            self._pubsub = pubsub
            return pubsub

    def _on_message(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        ch = self._channels.get(_text(message.get("channel", b"")))
        if ch is None:
            return
        if kind == "subscribe":
            ch.unconfirmed = max(0, ch.unconfirmed - 1)
            if ch.unconfirmed == 0:
                ch.ready.set()
        elif kind == "message":
            mid, _, at = _text(message["data"]).partition(" ")
            result = DeliveryResult(mid, float(at))
            for waiter in ch.waiters.get(mid, ()):
                waiter.result = result
                waiter.poke.set()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closed:
            pubsub: PubSub | None = None
            try:
                pubsub = await self._connect()
                backoff = 0.05
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._on_message(message)
            except (rexc.RedisError, OSError) as exc:
                log.debug("ack listener: %s; reconnecting", type(exc).__name__)
            finally:
                self._pubsub = None
                for ch in self._channels.values():
                    ch.subscribed, ch.unconfirmed = False, 0
                    ch.ready.clear()
                    for waiters in ch.waiters.values():
                        for waiter in waiters:
                            waiter.poke.set()  # re-check: a publish may have been lost
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class RedisStore(OneAtATime):
    """The `Store` on Redis (5+ client, Redis server 7+ for the event gap check)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        cipher: CredentialCipher | None = None,
        credential_key: bytes | None = None,
        ephemeral_key: bool = False,
        key_prefix: str = "broker",
        event_log_size: int = 10_000,
        idempotency_ttl_s: float = 86400,
        state_ttl_s: float | None = None,
        recheck_s: float = 5.0,
        inbound_redeliver_after_s: float = 30.0,
        inbound_retention_s: float | None = None,
        consumer: str | None = None,
    ) -> None:
        """`consumer`: this instance's name in the outbox consumer groups.

        `inbound_retention_s`: inbound messages older than this are trimmed (with
        their de-dup entries) as new ones arrive, acked or not; None keeps them.

        `state_ttl_s`: expiry of a session's last-event record (refreshed on every
        event); None keeps it for as long as the session exists."""
        self._cipher = self.resolve_cipher(cipher, credential_key, ephemeral_key)
        self._client = client
        self._prefix = key_prefix
        self.keys = RedisKeys(key_prefix)
        self._event_log_size = event_log_size
        self._idem_ttl_ms = max(1, int(idempotency_ttl_s * 1000))
        self._state_ttl_ms = int(state_ttl_s * 1000) if state_ttl_s else 0
        self._outbox_seen: dict[str, str] = {}
        kwargs = client.connection_pool.connection_kwargs
        self._where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        if "path" in kwargs:
            self._where = f"unix:{kwargs['path']}"
        self._apply_outbox = client.register_script(_APPLY_OUTBOX)
        self._pending = client.register_script(_PENDING)
        self._create = client.register_script(_CREATE_SESSION)
        self._set_enabled = client.register_script(_SET_ENABLED)
        self._append_event = client.register_script(_APPEND_EVENT)
        self._report_live = client.register_script(_REPORT_LIVE)
        self._set_credentials = client.register_script(_SET_CREDENTIALS)
        self._new_fence = client.register_script(_NEW_FENCE)
        self._claim_outbox = client.register_script(_CLAIM_OUTBOX)
        self._acks = _AckListener(client, f"{key_prefix}:ack-listener", recheck_s)
        self._add_inbound = client.register_script(_ADD_INBOUND)
        self._redeliver_after_ms = max(1, int(inbound_redeliver_after_s * 1000))
        #: the inbound script's retention argument (0: keep everything)
        self._inbound_retention_ms = (max(1, int(inbound_retention_s * 1000))
                                      if inbound_retention_s else 0)
        self._inbound_groups: set[tuple[str, str]] = set()
        self.consumer = consumer or f"c-{uuid.uuid4().hex[:12]}"
        self._outbox_groups: set[str] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        credential_key: bytes | None = None,
        cipher: CredentialCipher | None = None,
        ephemeral_key: bool = False,
        key_prefix: str = "broker",
        event_log_size: int = 10_000,
        idempotency_ttl_s: float = 86400,
        state_ttl_s: float | None = None,
        connect_timeout_s: float = 2.0,
        socket_timeout_s: float = 10.0,
        retries: int = 2,
        recheck_s: float = 5.0,
        inbound_redeliver_after_s: float = 30.0,
        inbound_retention_s: float | None = None,
        consumer: str | None = None,
    ) -> RedisStore:
        """Connect lazily to `url` (redis://, rediss://, unix://).

        Few, short retries: when Redis is down a caller should hear UNAVAILABLE
        within about a second and retry with its idempotency key, rather than
        hang in the client's own long default backoff.
        """
        resolved = cls.resolve_cipher(cipher, credential_key, ephemeral_key)
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        )
        return cls(
            client, cipher=resolved, key_prefix=key_prefix, event_log_size=event_log_size,
            idempotency_ttl_s=idempotency_ttl_s, state_ttl_s=state_ttl_s, recheck_s=recheck_s,
            inbound_redeliver_after_s=inbound_redeliver_after_s,
            inbound_retention_s=inbound_retention_s, consumer=consumer,
        )

    @staticmethod
    def resolve_cipher(
        cipher: CredentialCipher | None, credential_key: bytes | None, ephemeral_key: bool
    ) -> CredentialCipher:
        """Explicit cipher, else the given key, else the environment, else an ephemeral key
        only if asked for: credentials are never stored in clear."""
        if cipher is not None:
            return cipher
        if credential_key is not None:
            return CredentialCipher.from_key(credential_key)
        from_env = CredentialCipher.from_env()
        if from_env is not None:
            return from_env
        if ephemeral_key:
            log.warning("credentials are encrypted with an ephemeral key: they will not "
                        "decrypt after this process exits")
            return CredentialCipher.ephemeral()
        raise CredentialKeyError(
            f"the Redis store needs a key to encrypt session credentials at rest: {HOW_TO_SET_KEY}"
        )

    def __repr__(self) -> str:
        return f"RedisStore({self._where}, prefix={self._prefix!r}, cipher={self._cipher!r})"

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @property
    def cipher(self) -> CredentialCipher:
        return self._cipher

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"the Redis store at {self._where} is unavailable ({type(exc).__name__}: {exc}); "
            "retry shortly (Send: with the same idempotency key)",
            retry_after_s=1.0,
        )

    # key names (broker.store.redis_keys)
    def session_tag(self, session_id: str) -> str:
        return self.keys.session_tag(session_id)

    def _key(self, session_id: str, part: str) -> str:
        return self.keys.session(session_id, part)

    @property
    def _sessions_key(self) -> str:
        return self.keys.sessions

    def _tenant_key(self, tenant: str) -> str:
        return self.keys.tenant(tenant)

    @property
    def events_key(self) -> str:
        return self.keys.events

    def ack_channel(self, session_id: str) -> str:
        return self._key(session_id, "acked")

    # sessions
    @staticmethod
    def _record(session_id: str, raw: Mapping[Any, Any]) -> SessionRecord:
        data = _fields(raw)
        return SessionRecord(
            session_id=session_id, tenant=data.get("tenant", ""),
            enabled=data.get("enabled", "1") == "1",
            created_at=float(data.get("created_at", "0") or 0),
        )

    @_guard
    async def create_session(self, record: SessionRecord) -> tuple[SessionRecord, bool]:
        sid = record.session_id
        existing = await self._create(
            keys=[self._key(sid, "session")],
            args=[record.tenant, "1" if record.enabled else "0", repr(record.created_at)],
        )
        stored = record
        if existing:
            flat = list(existing)
            stored = self._record(sid, dict(zip(flat[::2], flat[1::2], strict=True)))
        # Index after the record exists; repeated on every create so a retry repairs a
        # crash between the two (the index keys live in other cluster slots).
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.sadd(self._sessions_key, sid)
            pipe.sadd(self._tenant_key(stored.tenant), sid)
            await pipe.execute()
        return stored, not existing

    @_guard
    async def get_session(self, session_id: str) -> SessionRecord | None:
        raw = await self._client.hgetall(self._key(session_id, "session"))
        return self._record(session_id, raw) if raw else None

    @_guard
    async def list_sessions(self, tenant: str | None = None) -> list[SessionRecord]:
        index = self._sessions_key if tenant is None else self._tenant_key(tenant)
        ids = sorted(_text(m) for m in await self._client.smembers(index))
        if not ids:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for sid in ids:
                pipe.hgetall(self._key(sid, "session"))
            rows = await pipe.execute()
        return [
            record for sid, raw in zip(ids, rows, strict=True) if raw
            for record in [self._record(sid, raw)]
            if tenant is None or record.tenant == tenant
        ]

    @_guard
    async def set_enabled(self, session_id: str, enabled: bool) -> None:
        await self._set_enabled(keys=[self._key(session_id, "session")],
                                args=["1" if enabled else "0"])

    @_guard
    async def delete_session(self, session_id: str) -> None:
        """Remove the session and every key under its hash tag but its fencing token,
        which is raised first: a former owner's late writes are refused, and a
        re-created session's owner starts above every earlier token."""
        raw = await self._client.hgetall(self._key(session_id, "session"))
        fence = self.keys.fence(session_id)
        await self._new_fence(keys=[fence])
        pattern = _glob_escape(self.session_tag(session_id)) + ":*"
        batch: list[bytes | str] = []
        async for key in self._client.scan_iter(match=pattern, count=500):
            if _text(key) == fence:
                continue
            batch.append(key)
            if len(batch) >= 500:
                await self._client.unlink(*batch)
                batch.clear()
        if batch:
            await self._client.unlink(*batch)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.srem(self._sessions_key, session_id)
            if raw:
                pipe.srem(self._tenant_key(_fields(raw).get("tenant", "")), session_id)
            await pipe.execute()
        self._outbox_seen.pop(session_id, None)

    # fencing
    @_guard
    async def new_fence(self, session_id: str) -> int:
        return int(_text(await self._new_fence(keys=[self.keys.fence(session_id)])))

    # credentials
    @_guard
    async def save_credentials(
        self, session_id: str, credentials: dict[str, Any], *, fence: int | None = None
    ) -> None:
        sealed = self._cipher.encrypt(session_id, credentials)
        await self._set_credentials(keys=[self._key(session_id, "creds"),
                                          self.keys.fence(session_id)],
                                    args=[fence_arg(fence), sealed])

    @_guard
    async def load_credentials(self, session_id: str) -> dict[str, Any] | None:
        sealed = await self._client.get(self._key(session_id, "creds"))
        return None if sealed is None else self._cipher.decrypt(session_id, _bytes(sealed))

    @_guard
    async def has_credentials(self, session_id: str) -> bool:
        return bool(await self._client.exists(self._key(session_id, "creds")))

    @_guard
    async def clear_credentials(self, session_id: str, *, fence: int | None = None) -> None:
        await self._set_credentials(keys=[self._key(session_id, "creds"),
                                          self.keys.fence(session_id)],
                                    args=[fence_arg(fence)])

    # outbox
    @staticmethod
    def _message(session_id: str, key: str, raw: bytes | str) -> OutboxMessage:
        mid, to, body, seq, at = json.loads(raw)
        return OutboxMessage(
            session_id=session_id, message_id=mid, to=to, body=body, idempotency_key=key,
            sequence=int(seq), accepted_at=float(at),
        )

    def _idem_key(self, session_id: str, idempotency_key: str) -> str:
        return self._key(session_id, f"idem:{idempotency_key}")

    def _result_key(self, session_id: str, message_id: str) -> str:
        return self._key(session_id, f"result:{message_id}")

    @_guard
    async def apply_outbox(
        self, session_id: str, batch: OutboxBatch, *, max_depth: int, at: float,
        fence: int | None = None,
    ) -> OutboxBatchResult:
        """One Lua script (_APPLY_OUTBOX): key checks, depth checks, sequences, XADDs,
        acks and the claiming read are atomic, and a batch costs one round trip."""
        if not batch.acks and not batch.messages:
            return OutboxBatchResult([], [])
        at_text = repr(at)
        args: list[str | int] = [
            at_text, max_depth, self._idem_key(session_id, ""), self._result_key(session_id, ""),
            self._idem_ttl_ms, self.ack_channel(session_id), OUTBOX_GROUP, self.consumer,
            1 if batch.claim else 0, len(batch.acks), fence_arg(fence), *batch.acks,
        ]
        for m in batch.messages:
            args += [f"m-{uuid.uuid4().hex}", m.to, m.body, m.idempotency_key]
        keys = [self._key(session_id, "outbox"), self._key(session_id, "ids"),
                self._key(session_id, "seq"), self.keys.fence(session_id)]
        reply: Any = await self._apply_outbox(keys=keys, args=args)
        acked_raw, accepted_raw, claimed_raw, unread = reply
        acked = [DeliveryResult(mid, float(_text(raw)))
                 for mid, raw in zip(batch.acks, acked_raw, strict=True)]
        accepted: list[Accepted | OutboxFull] = []
        for new, item in zip(batch.messages, accepted_raw, strict=True):
            kind = _text(item[0])
            if kind == "full":
                accepted.append(OutboxFull(
                    f"outbox of {session_id!r} holds {_text(item[1])} undelivered messages",
                    session_id=session_id, retry_after_s=1.0,
                ))
                continue
            message = self._message(session_id, new.idempotency_key, item[1])
            if kind == "dup":
                done = item[2] if len(item) > 2 else None
                result = DeliveryResult(message.message_id, float(_text(done))) if done else None
                accepted.append(Accepted(message, True, result))
            else:
                accepted.append(Accepted(message, False))
        claimed = [self._entry(session_id, row) for row in claimed_raw]
        return OutboxBatchResult(acked, accepted, claimed, bool(unread))

    @_guard
    async def find_by_key(self, session_id: str, idempotency_key: str) -> Accepted | None:
        raw = await self._client.get(self._idem_key(session_id, idempotency_key))
        if raw is None:
            return None
        message = self._message(session_id, idempotency_key, raw)
        return Accepted(message, True, await self._result(session_id, message.message_id))

    async def _outbox_group(self, key: str) -> None:
        """Create the owners' consumer group (from the first entry) once per stream."""
        if key in self._outbox_groups:
            return
        try:
            await self._client.xgroup_create(key, OUTBOX_GROUP, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._outbox_groups.add(key)

    @_guard
    async def claim_outbox(self, session_id: str, *, fence: int | None = None) -> int:
        """Take over what previous owners read and never acked (XAUTOCLAIM, see
        _TAKE_OVER); `pending` does the same on every read, so this only counts.

        The lease (and the fence) guarantee the previous consumer is gone, so
        nothing has to sit idle first.
        """
        key = self._key(session_id, "outbox")
        args: list[str | int] = [OUTBOX_GROUP, self.consumer, fence_arg(fence)]
        return int(await self._in_group(key, self._claim_outbox, [key, self.keys.fence(session_id)],
                                        args))

    @_guard
    async def pending(
        self, session_id: str, limit: int, after_sequence: int = 0, *, fence: int | None = None
    ) -> list[OutboxMessage]:
        """One script takes over former owners' unacked entries, then reads the consumer's
        pending list, then new entries (see _PENDING)."""
        if limit <= 0:
            return []
        key = self._key(session_id, "outbox")
        args: list[str | int] = [OUTBOX_GROUP, self.consumer, limit, after_sequence,
                                 fence_arg(fence)]
        rows = await self._in_group(key, self._pending, [key, self.keys.fence(session_id)], args)
        return [self._entry(session_id, row) for row in rows]

    async def _in_group(
        self, key: str, script: Any, keys: list[str], args: Sequence[str | int]
    ) -> Any:
        """Run a script that reads the outbox through the owners' group, creating the
        group when it is missing (first use, or the stream was deleted and recreated)."""
        await self._outbox_group(key)
        try:
            return await script(keys=keys, args=args)
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._outbox_groups.discard(key)
            await self._outbox_group(key)
            return await script(keys=keys, args=args)

    @staticmethod
    def _entry(session_id: str, row: Sequence[bytes | str]) -> OutboxMessage:
        """An outbox stream entry, given as its flat field list."""
        f = {_text(k): _text(v) for k, v in zip(row[::2], row[1::2], strict=True)}
        return OutboxMessage(
            session_id=session_id, message_id=f["mid"], to=f["to"], body=f["body"],
            idempotency_key=f["key"], sequence=int(f["seq"]), accepted_at=float(f["at"]),
        )

    async def _result(self, session_id: str, message_id: str) -> DeliveryResult | None:
        raw = await self._client.get(self._result_key(session_id, message_id))
        return None if raw is None else DeliveryResult(message_id, float(_text(raw)))

    @_guard
    async def result(self, session_id: str, message_id: str) -> DeliveryResult | None:
        return await self._result(session_id, message_id)

    @_guard
    async def wait_result(
        self, session_id: str, message_id: str, timeout: float
    ) -> DeliveryResult | None:
        """Wait for the ack, whichever broker instance receives it (pub/sub wake-up)."""
        if timeout <= 0:
            return await self._result(session_id, message_id)
        return await self._acks.wait(
            self.ack_channel(session_id), message_id, timeout,
            lambda: self._result(session_id, message_id),
        )

    @_guard
    async def outbox_depth(self, session_id: str) -> int:
        return int(await self._client.xlen(self._key(session_id, "outbox")))

    @_guard
    async def wait_outbox(self, session_id: str, timeout: float) -> None:
        """XREAD BLOCK past the newest entry this instance saw at its previous wake-up.

        The first call returns at once if anything is queued: a spurious wake-up
        costs one `pending` read, a missed one would strand a message.
        """
        key = self._key(session_id, "outbox")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = self._outbox_seen.get(session_id, "0-0")
        while (remaining := deadline - loop.time()) > 0:
            block_ms = max(1, int(min(remaining, _BLOCK_CHUNK_S) * 1000))
            reply: Any = await self._client.xread({key: last}, count=1, block=block_ms)
            if reply:
                entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
                seen = _text(entries[0][0])
                newest: Any = await self._client.xrevrange(key, count=1)
                if newest and event_order(_text(newest[0][0])) > event_order(seen):
                    seen = _text(newest[0][0])
                self._outbox_seen[session_id] = seen
                return

    # live state
    @_guard
    async def report_live(
        self, session_id: str, live: LiveState, ttl_s: float, *, fence: int | None = None
    ) -> None:
        await self._report_live(
            keys=[self._key(session_id, "live"), self.keys.fence(session_id)],
            args=[fence_arg(fence), max(1, int(ttl_s * 1000)),
                  "state", live.state.value, "owner", live.owner,
                  "activity", repr(live.last_activity), "at", repr(live.reported_at)],
        )

    @_guard
    async def get_live(self, session_id: str) -> LiveState | None:
        raw: Any = await self._client.hgetall(self._key(session_id, "live"))
        if not raw:
            return None
        f = _fields(raw)
        return LiveState(State(f["state"]), f["owner"], float(f["activity"]), float(f["at"]))

    # events
    @_guard
    async def append_event(self, event: StatusEvent, *, fence: int | None = None) -> StatusEvent:
        """One script (_APPEND_EVENT) logs the event and makes it the session's last."""
        sid = event.session_id
        entry_id = await self._append_event(
            keys=[self.events_key, self._key(sid, "last"), self.keys.fence(sid)],
            args=[fence_arg(fence), _event_to_json(event), self._event_log_size,
                  self._state_ttl_ms],
        )
        return event.with_id(_text(entry_id))

    @_guard
    async def last_event(self, session_id: str) -> StatusEvent | None:
        entry_id, raw = await self._client.hmget(self._key(session_id, "last"), ["id", "event"])
        if raw is None:
            return None
        return _event_from_json(raw, _text(entry_id) if entry_id is not None else None)

    @_guard
    async def events_after(self, event_id: str, limit: int) -> EventPage:
        """Events strictly after the cursor; `gap` when the log may have trimmed one of them.

        Trimming (MAXLEN ~) only removes the oldest entries, and XINFO counts every
        entry ever added: if that exceeds the length, entries older than the first
        retained one are gone, so a cursor older than that entry may have missed
        some. One case is conservative: a cursor equal to the very last trimmed id
        also reports a gap (the caller resyncs from a snapshot; nothing is lost).
        """
        ms, n = event_order(event_id)
        if ms < 0 or ms > _MAX_ID_PART or n > _MAX_ID_PART:
            return EventPage(gap=True)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xrange(self.events_key, min=f"({ms}-{n}", max="+", count=max(limit, 1))
            pipe.xinfo_stream(self.events_key)
            rows, info = await pipe.execute(raise_on_error=False)
        if isinstance(rows, Exception):
            raise rows
        if isinstance(info, Exception):  # no log yet: nothing was ever trimmed
            info = {}
        if self._trimmed_past(info, (ms, n)):
            return EventPage(gap=True)
        events = [_event_from_json(raw[b"e"] if b"e" in raw else raw["e"], _text(entry_id))
                  for entry_id, raw in rows]
        return EventPage(events[:limit] if limit > 0 else [])

    @_guard
    async def latest_event_id(self) -> str:
        """The newest event id ("0-0" when none): where a live tail starts."""
        rows: Any = await self._client.xrevrange(self.events_key, count=1)
        return _text(rows[0][0]) if rows else "0-0"

    @_guard
    async def tail_events(self, after: str, block_s: float) -> list[StatusEvent]:
        """Events after the cursor, waiting up to block_s for the first one.

        Every instance tails the one event log, so StreamStatus on any instance
        shows every session's transitions, whoever owns them.
        """
        block_ms = max(1, int(min(block_s, _BLOCK_CHUNK_S) * 1000))
        reply: Any = await self._client.xread({self.events_key: after}, count=1000,
                                              block=block_ms)
        events: list[StatusEvent] = []
        for _stream, rows in reply or []:
            for entry_id, raw in rows:
                events.append(_event_from_json(raw[b"e"] if b"e" in raw else raw["e"],
                                               _text(entry_id)))
        return events

    @staticmethod
    def _trimmed_past(info: Mapping[str, Any], cursor: tuple[int, int]) -> bool:
        deleted = info.get("max-deleted-entry-id")  # XDEL'd entries (not used by the broker)
        if deleted is not None and event_order(_text(deleted)) > cursor:
            return True
        added, length = info.get("entries-added"), info.get("length", 0)
        if added is None or int(added) <= int(length):
            return False
        first = info.get("first-entry")
        if first is None or not first[0]:  # everything trimmed: only newer ones are safe
            last = info.get("last-generated-id")
            return last is None or event_order(_text(last)) > cursor
        return event_order(_text(first[0])) > cursor

    async def close(self) -> None:
        await self._acks.close()
        with contextlib.suppress(rexc.RedisError, OSError):
            await self._client.aclose()

    # inbound
    @staticmethod
    def _inbound_record(
        session_id: str, entry_id: bytes | str, raw: Mapping[Any, Any]
    ) -> InboundRecord:
        f = _fields(raw)
        return InboundRecord(
            session_id=session_id, inbound_id=_text(entry_id), upstream_id=f["uid"],
            sender=f["from"], body=f["body"], received_at=float(f["at"]),
        )

    @_guard
    async def add_inbound(
        self, session_id: str, upstream_id: str, sender: str, body: str, at: float, *,
        fence: int | None = None,
    ) -> InboundRecord | None:
        """One Lua script: the fence and de-dup checks, the append and the trim are atomic."""
        entry = await self._add_inbound(
            keys=[self._key(session_id, "inbound"), self._key(session_id, "inbound:seen"),
                  self._key(session_id, "inbound:aged"), self.keys.fence(session_id)],
            args=[upstream_id, sender, body, repr(at), self._inbound_retention_ms,
                  fence_arg(fence)],
        )
        if entry is None:
            return None
        return InboundRecord(
            session_id=session_id, inbound_id=_text(entry), upstream_id=upstream_id,
            sender=sender, body=body, received_at=at,
        )

    @_guard
    async def read_inbound(
        self, session_id: str, group: str, consumer: str, count: int, block_s: float
    ) -> list[InboundDelivery]:
        if count <= 0:
            return []
        key = self._key(session_id, "inbound")
        if (key, group) not in self._inbound_groups:
            await self._create_group(key, group)
        try:
            return await self._read_group(session_id, key, group, consumer, count, block_s)
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        # The stream was deleted with its session (or by hand): recreate, read once more.
        await self._create_group(key, group)
        return await self._read_group(session_id, key, group, consumer, count, block_s)

    async def _create_group(self, key: str, group: str) -> None:
        """At the start of the stream ("0"), so messages stored before any reader count."""
        try:
            await self._client.xgroup_create(key, group, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._inbound_groups.add((key, group))

    async def _read_group(
        self, session_id: str, key: str, group: str, consumer: str, count: int, block_s: float
    ) -> list[InboundDelivery]:
        out = await self._claim(session_id, key, group, consumer, count)
        if len(out) >= count:
            return out
        block_ms = None if out or block_s <= 0 else max(1, int(min(block_s, _BLOCK_CHUNK_S) * 1000))
        reply: Any = await self._client.xreadgroup(
            group, consumer, {key: ">"}, count=count - len(out), block=block_ms,
        )
        if reply:
            entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
            out.extend(InboundDelivery(self._inbound_record(session_id, entry_id, raw), 1)
                       for entry_id, raw in entries if raw)
        return out

    async def _claim(
        self, session_id: str, key: str, group: str, consumer: str, count: int
    ) -> list[InboundDelivery]:
        """XAUTOCLAIM entries idle past the redelivery delay, then read their counters."""
        claimed: list[InboundRecord] = []
        cursor = "0-0"
        for _ in range(_MAX_CLAIM_ROUNDS):
            reply: Any = await self._client.xautoclaim(
                key, group, consumer, self._redeliver_after_ms, cursor,
                count=count - len(claimed),
            )
            cursor = _text(reply[0])
            claimed.extend(self._inbound_record(session_id, entry_id, raw)
                           for entry_id, raw in reply[1] if raw)
            if cursor == "0-0" or len(claimed) >= count:
                break
        if not claimed:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for record in claimed:
                pipe.xpending_range(key, group, record.inbound_id, record.inbound_id, 1)
            rows = await pipe.execute()
        counts = [int(row[0]["times_delivered"]) if row else 2 for row in rows]
        return [InboundDelivery(r, c) for r, c in zip(claimed, counts, strict=True)]

    @_guard
    async def ack_inbound(self, session_id: str, group: str, inbound_ids: list[str]) -> int:
        if not inbound_ids:
            return 0
        return int(await self._client.xack(self._key(session_id, "inbound"), group,
                                           *dict.fromkeys(inbound_ids)))
