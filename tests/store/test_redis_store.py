"""What only the Redis store promises: encryption at rest, restarts, outages, key layout."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from redis.exceptions import ResponseError

from broker.errors import NotOwner, StoreUnavailable
from broker.lifecycle.states import State
from broker.store.base import NewMessage, OutboxBatch, SessionRecord, StatusEvent
from broker.store.crypto import (
    KEY_FILE_ENV,
    KEYS_ENV,
    CredentialCipher,
    CredentialDecryptError,
    CredentialKeyError,
    generate_key,
    parse_keys,
)
from broker.store.redis import RedisStore
from broker.store.redis.core import server_reply
from tests.redis_server import RedisServer
from tests.store.conftest import RECHECK_S, TEST_KEY, mark_acked, open_redis

pytestmark = pytest.mark.redis

WAIT_S = 30.0
SECRET = "SECRET-TOKEN-6b1f"


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key(seed: int) -> bytes:
    return bytes([seed]) * 32


def _cipher(current: str, **keys: bytes) -> CredentialCipher:
    return CredentialCipher(keys, current)


@pytest.fixture
async def store(shared_redis: RedisServer) -> AsyncIterator[RedisStore]:
    s = open_redis(shared_redis)
    yield s
    await s.close()


async def _raw(store: RedisStore, key: str) -> bytes:
    value = await store.client.get(key)
    assert isinstance(value, bytes)
    return value


# encryption at rest
async def test_stored_credentials_hold_no_plaintext(store: RedisStore) -> None:
    await store.save_credentials("s1", {"token": SECRET, "user": "alice"})
    raw = await _raw(store, store.keys.creds("s1"))
    assert SECRET.encode() not in raw and b"alice" not in raw and b"token" not in raw
    assert CredentialCipher.key_id_of(raw) == store.cipher.current_key_id
    await store.save_credentials("s1", {"token": SECRET, "user": "alice"})
    assert await _raw(store, store.keys.creds("s1")) != raw, "fresh nonce per write"
    assert SECRET not in repr(store) and SECRET not in repr(store.cipher)
    assert base64.b64encode(TEST_KEY).decode() not in repr(store)


async def test_wrong_key_or_other_session_fails_without_leaking(
    store: RedisStore, shared_redis: RedisServer,
) -> None:
    await store.save_credentials("s1", {"token": SECRET})
    sealed = await _raw(store, store.keys.creds("s1"))

    await store.client.set(store.keys.creds("s2"), sealed)
    with pytest.raises(CredentialDecryptError) as copied:
        await store.load_credentials("s2")
    assert SECRET not in str(copied.value)

    same_id_other_key = RedisStore(
        store.client, cipher=_cipher(store.cipher.current_key_id,
                                     **{store.cipher.current_key_id: _key(9)}),
    )
    with pytest.raises(CredentialDecryptError) as wrong:
        await same_id_other_key.load_credentials("s1")
    assert SECRET not in str(wrong.value) and sealed.decode() not in str(wrong.value)

    unknown = RedisStore.from_url(shared_redis.url, credential_key=_key(7))
    try:
        with pytest.raises(CredentialDecryptError, match="not configured"):
            await unknown.load_credentials("s1")
    finally:
        await unknown.close()


async def test_key_rotation(shared_redis: RedisServer) -> None:
    old = RedisStore.from_url(shared_redis.url, cipher=_cipher("k1", k1=_key(1)))
    rotated = RedisStore.from_url(shared_redis.url,
                                  cipher=_cipher("k2", k2=_key(2), k1=_key(1)))
    new_only = RedisStore.from_url(shared_redis.url, cipher=_cipher("k2", k2=_key(2)))
    try:
        await old.save_credentials("s1", {"token": SECRET})
        assert await rotated.load_credentials("s1") == {"token": SECRET}
        await rotated.save_credentials("s1", {"token": SECRET})
        raw = await _raw(rotated, rotated.keys.creds("s1"))
        assert CredentialCipher.key_id_of(raw) == "k2"
        assert await new_only.load_credentials("s1") == {"token": SECRET}
        with pytest.raises(CredentialDecryptError):
            await old.load_credentials("s1")
    finally:
        for s in (old, rotated, new_only):
            await s.close()


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    k1, k2 = generate_key(), generate_key()
    cipher = CredentialCipher.from_env({KEYS_ENV: f"new:{k1}, old:{k2}"})
    assert cipher is not None and cipher.current_key_id == "new"
    assert cipher.key_ids == ["new", "old"]
    assert k1 not in repr(cipher)
    path = tmp_path / "keys"
    path.write_text(f"f1:{k2}\n")
    from_file = CredentialCipher.from_env({KEY_FILE_ENV: str(path)})
    assert from_file is not None and from_file.current_key_id == "f1"
    sealed = from_file.encrypt("s", {"a": 1})
    assert CredentialCipher({"f1": base64.b64decode(k2)}, "f1").decrypt("s", sealed) == {"a": 1}
    assert CredentialCipher.from_env({}) is None
    short = base64.b64encode(b"short-key").decode()
    for bad in ["nocolon", "k:not-base64!", f"k:{short}", ",", f"bad id:{k1}", f"a:{k1},a:{k2}"]:
        with pytest.raises(CredentialKeyError) as caught:
            parse_keys(bad, KEYS_ENV)
        message = str(caught.value)
        assert "not-base64!" not in message and short not in message and k1 not in message


async def test_refuses_to_start_without_a_key(
    shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    with pytest.raises(CredentialKeyError, match=KEYS_ENV):
        RedisStore.from_url(shared_redis.url)
    ephemeral = RedisStore.from_url(shared_redis.url, ephemeral_key=True)
    monkeypatch.setenv(KEYS_ENV, f"env1:{generate_key()}")
    from_env = RedisStore.from_url(shared_redis.url)
    try:
        assert from_env.cipher.current_key_id == "env1"
        await ephemeral.save_credentials("s1", {"token": SECRET})
        assert await ephemeral.load_credentials("s1") == {"token": SECRET}
    finally:
        await ephemeral.close()
        await from_env.close()


# durability and outages
async def _fill(store: RedisStore) -> tuple[str, str, StatusEvent]:
    await store.create_session(SessionRecord("s1", "t1", created_at=1.0))
    await store.save_credentials("s1", {"token": SECRET})
    done = await store.enqueue("s1", "+1", "delivered", "k1", max_depth=10, at=1.0)
    waiting = await store.enqueue("s1", "+1", "waiting", "k2", max_depth=10, at=2.0)
    await mark_acked(store, "s1", done.message.message_id, 3.0)
    event = await store.append_event(StatusEvent("s1", "t1", 1, State.OPEN, State.CONNECTING))
    return done.message.message_id, waiting.message.message_id, event


async def _check_survived(store: RedisStore, done: str, waiting: str, event: StatusEvent) -> None:
    assert await store.get_session("s1") == SessionRecord("s1", "t1", created_at=1.0)
    assert [r.session_id for r in await store.list_sessions("t1")] == ["s1"]
    assert await store.load_credentials("s1") == {"token": SECRET}
    assert [m.message_id for m in await store.pending("s1", 10)] == [waiting]
    found = await store.find_by_key("s1", "k1")
    assert found is not None and found.result is not None and found.result.message_id == done
    assert await store.last_event("s1") == event
    assert (await store.events_after("0-0", 10)).events == [event]
    nxt = await store.enqueue("s1", "+1", "after", "k3", max_depth=10, at=4.0)
    assert nxt.message.sequence == 3


async def test_a_stale_owners_write_is_not_owner_with_replica_durability(
    shared_redis: RedisServer,
) -> None:
    """The replica durability runs the outbox script and WAIT in one pipeline, where
    redis-py wraps the script's FENCED reply: it must still be NotOwner (the actor
    steps down), never an internal error answered to the Send."""
    store = open_redis(shared_redis, durability="replica")
    try:
        await store.create_session(SessionRecord("fenced-r", "t1"))
        old = await store.new_fence("fenced-r")
        await store.new_fence("fenced-r")
        batch = OutboxBatch(messages=[NewMessage("+1", "b", "k-stale")], claim=True)
        with pytest.raises(NotOwner):
            await store.apply_outbox("fenced-r", batch, max_depth=10, at=1.0, fence=old)
    finally:
        await store.close()


def test_a_pipelined_reply_is_read_past_redis_pys_prefix() -> None:
    wrapped = ResponseError("Command # 1 (EVALSHA abc 5 k...) of pipeline caused error: "
                            "NOREPLICAS Not enough good replicas to write.")
    assert server_reply(wrapped).startswith("NOREPLICAS")
    assert server_reply(ResponseError("FENCED token 3 is stale")) == "FENCED token 3 is stale"


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_data_survives_a_redis_restart(redis_server: RedisServer, how: str) -> None:
    store = open_redis(redis_server)
    try:
        done, waiting, event = await _fill(store)
        redis_server.stop() if how == "stop" else redis_server.kill()
        redis_server.start()
        await _check_survived(store, done, waiting, event)  # the same store reconnects
    finally:
        await store.close()


async def test_unavailable_while_down_then_recovers(redis_server: RedisServer) -> None:
    store = open_redis(redis_server)
    try:
        await store.create_session(SessionRecord("s1", "t1"))
        redis_server.stop()
        with pytest.raises(StoreUnavailable) as caught:
            await store.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=1.0)
        err = caught.value
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "STORE_UNAVAILABLE"
        assert f"127.0.0.1:{redis_server.port}" in err.message
        for call in (store.get_session("s1"), store.load_credentials("s1"),
                     store.wait_result("s1", "m-x", 0.5), store.events_after("0-0", 10),
                     store.wait_outbox("s1", 0.5)):
            with pytest.raises(StoreUnavailable):
                await call
        redis_server.start()
        accepted = await store.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=1.0)
        assert not accepted.duplicate
        assert (await store.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=1.0)).duplicate
    finally:
        await store.close()


async def test_a_waiter_survives_a_redis_restart(redis_server: RedisServer) -> None:
    """Pub/sub drops messages across a reconnect; the waiter re-checks after resubscribing."""
    acker, waiter_store = open_redis(redis_server), open_redis(redis_server)
    try:
        mid = (await acker.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=1.0)) \
            .message.message_id
        waiter = asyncio.create_task(waiter_store.wait_result("s1", mid, WAIT_S))
        for _ in range(20):
            await asyncio.sleep(0.005)
        redis_server.restart()
        result = await mark_acked(acker, "s1", mid, 2.0)
        assert await asyncio.wait_for(waiter, WAIT_S) == result
        assert RECHECK_S > WAIT_S  # so the safety-net re-check cannot be what woke it
    finally:
        await acker.close()
        await waiter_store.close()


# key layout
async def test_every_key_of_a_session_shares_one_hash_tag(store: RedisStore) -> None:
    for sid in ("s1", "tenant.x:42"):
        await store.create_session(SessionRecord(sid, "t1"))
        await store.save_credentials(sid, {"token": SECRET})
        acked = await store.enqueue(sid, "+1", "a", "key:1", max_depth=10, at=1.0)
        await store.enqueue(sid, "+1", "b", "key:2", max_depth=10, at=1.0)
        await mark_acked(store, sid, acked.message.message_id, 2.0)
        await store.append_event(StatusEvent(sid, "t1", 1, State.OPEN, State.CONNECTING))
    keys = sorted(_str(k) for k in await store.client.keys("*"))
    tags: dict[str, set[str]] = {}
    global_keys = []
    for key in keys:
        match = re.fullmatch(r"broker:\{(s:[^}]*)\}:.+", key)
        if match:
            tags.setdefault(match.group(1), set()).add(key)
        else:
            global_keys.append(key)
    assert global_keys == ["broker:events", "broker:sessions", "broker:sessions:version",
                           "broker:tenant:t1"]
    assert set(tags) == {"s:s1", "s:tenant.x:42"}
    parts = {k.split("}:", 1)[1].split(":", 1)[0] for k in tags["s:s1"]}
    assert parts == {"session", "creds", "outbox", "ids", "seq", "idem", "result", "last"}

    await store.delete_session("tenant.x:42")
    left = [_str(k) for k in await store.client.keys("*")]
    # Only the fencing token outlives its session, so a re-created one never reuses it.
    assert [k for k in left if "{s:tenant.x:42}" in k] == ["broker:{s:tenant.x:42}:fence"]
    assert "broker:tenant:t1" in left  # s1 is still in it


async def test_new_owner_reclaims_what_a_dead_consumer_read(shared_redis: RedisServer) -> None:
    """The outbox is read through a consumer group; every read takes over the
    other consumers' pending lists with XAUTOCLAIM and keeps the original order."""
    old = open_redis(shared_redis, consumer="old-owner")
    new = open_redis(shared_redis, consumer="new-owner")
    try:
        ids = [(await old.enqueue("s1", "+1", f"m{n}", f"k{n}", max_depth=100, at=1.0))
               .message.message_id for n in range(5)]
        read = await old.pending("s1", 3)  # in flight on the old owner, never acked
        assert [m.message_id for m in read] == ids[:3]
        # Every read takes over what other consumers (former owners) hold, in order:
        # nothing stays stranded with a consumer that no longer delivers.
        assert [m.message_id for m in await new.pending("s1", 10)] == ids
        assert await new.claim_outbox("s1") == 5  # all five are the new owner's now
        assert [m.message_id for m in await old.pending("s1", 10)] == ids  # and back
        assert [m.message_id for m in await new.pending("s1", 10)] == ids
        await mark_acked(new, "s1", ids[0], 2.0)
        assert [m.message_id for m in await new.pending("s1", 10)] == ids[1:]
        assert await new.outbox_depth("s1") == 4
    finally:
        await old.close()
        await new.close()


async def test_listing_reads_records_in_chunks_and_misses_none(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records are read a chunk per pipeline (the event loop turns between them);
    every record comes back once, whatever the chunk boundaries."""
    from broker.store.redis import sessions

    monkeypatch.setattr(sessions, "LIST_CHUNK", 3)
    tenant = "chunked"
    ids = [f"chunk-{i:02d}" for i in range(10)]
    for sid in ids:
        await store.create_session(SessionRecord(sid, tenant))
    pipelines: list[int] = []
    original = store.client.pipeline

    def counted(*args: object, **kwargs: object) -> object:
        pipelines.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.client, "pipeline", counted)
    assert [r.session_id for r in await store.list_sessions(tenant)] == ids
    assert len(pipelines) == 1 + 4  # the index, then 10 records in chunks of 3
