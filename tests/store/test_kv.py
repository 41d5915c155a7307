"""The per-session key-value area (an engine's auth state), on every backend:
atomic multi-key writes, deletes, isolation between sessions, wiped with the
session; on SQLite and Redis no value is stored in clear."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.errors import NotOwner
from broker.store.base import SessionRecord, Store
from broker.store.crypto import CredentialCipher, CredentialDecryptError
from broker.store.kv import SessionKV
from broker.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.store.conftest import Backend, mark_acked, open_redis, open_sqlite

SECRET = b'{"noiseKey":{"private":{"type":"Buffer","data":"c2VjcmV0LWtleS1tYXRlcmlhbA=="}}}'


async def test_set_get_delete_and_missing_keys(store: Store) -> None:
    await store.create_session(SessionRecord("s1", "t1"))
    assert await store.kv_get("s1", ["creds"]) == {}
    await store.kv_set("s1", {"creds": SECRET, "pre-key:1": b"one", "pre-key:2": b"two"})
    assert await store.kv_get("s1", ["creds", "pre-key:1", "pre-key:9"]) == {
        "creds": SECRET, "pre-key:1": b"one"}
    await store.kv_set("s1", {"pre-key:1": None, "pre-key:2": b"TWO", "session:a.0": b""})
    assert await store.kv_get("s1", ["pre-key:1", "pre-key:2", "session:a.0"]) == {
        "pre-key:2": b"TWO", "session:a.0": b""}
    assert await store.kv_get("s1", []) == {}


async def test_sessions_do_not_share_keys_and_clear_is_per_session(store: Store) -> None:
    await store.kv_set("s1", {"creds": b"one"})
    await store.kv_set("s2", {"creds": b"two"})
    assert await store.kv_get("s2", ["creds"]) == {"creds": b"two"}
    await store.kv_clear("s1")
    assert await store.kv_get("s1", ["creds"]) == {}
    assert await store.kv_get("s2", ["creds"]) == {"creds": b"two"}


async def test_delete_session_wipes_the_area(store: Store) -> None:
    await store.create_session(SessionRecord("s1", "t1"))
    await store.kv_set("s1", {"creds": SECRET, "app-state-sync-key:AAA": b"k"})
    await store.delete_session("s1")
    assert await store.kv_get("s1", ["creds", "app-state-sync-key:AAA"]) == {}


async def test_many_keys_in_one_write(store: Store) -> None:
    """A Baileys pre-key upload writes hundreds of keys at once."""
    values: dict[str, bytes | None] = {f"pre-key:{i}": f"v{i}".encode() for i in range(1500)}
    await store.kv_set("s1", values)
    got = await store.kv_get("s1", list(values))
    assert len(got) == 1500 and got["pre-key:1499"] == b"v1499"
    await store.kv_set("s1", dict.fromkeys(values))
    assert await store.kv_get("s1", list(values)) == {}


async def test_values_survive_a_second_view(backend: Backend) -> None:
    """Another instance (Redis) or the same process (memory, SQLite) reads them back."""
    first = await backend.open()
    await first.kv_set("s1", {"creds": SECRET})
    second = await backend.open()
    assert await second.kv_get("s1", ["creds"]) == {"creds": SECRET}


async def test_session_kv_writes_under_the_owner_fence(store: Store) -> None:
    await store.create_session(SessionRecord("s1", "t1"))
    old = await store.new_fence("s1")
    refused: list[NotOwner] = []
    stale = SessionKV(store, "s1", old, on_not_owner=refused.append)
    await stale.set({"creds": b"a"})
    current = SessionKV(store, "s1", await store.new_fence("s1"))
    await current.set({"creds": b"b"})
    with pytest.raises(NotOwner):
        await stale.set({"creds": b"stale"})
    with pytest.raises(NotOwner):
        await stale.clear()
    assert len(refused) == 2
    assert await current.get(["creds"]) == {"creds": b"b"}
    assert "b'b'" not in repr(current)
    await current.clear()
    assert await stale.get(["creds"]) == {}


# -- no plaintext at rest -----------------------------------------------------------


@pytest.mark.redis
async def test_raw_redis_holds_no_plaintext_value(shared_redis: RedisServer) -> None:
    store = open_redis(shared_redis)
    try:
        await store.kv_set("kv1", {"creds": SECRET, "pre-key:7": b"pre-key-material-77"})
        raw = {bytes(k): bytes(v) for k, v in  # type: ignore[arg-type]
               (await store.client.hgetall(store.keys.kv("kv1"))).items()}
        blob = b"".join(k + v for k, v in raw.items())
        assert b"secret-key-material" not in blob and b"c2VjcmV0LWtleS1tYXRlcmlh" not in blob
        assert b"pre-key-material-77" not in blob and b"noiseKey" not in blob
        assert CredentialCipher.key_id_of(raw[b"creds"]) == store.cipher.current_key_id
        # A value moved to another key name (or session) does not open.
        await store.client.hset(store.keys.kv("kv1"), "pre-key:8", raw[b"pre-key:7"])
        with pytest.raises(CredentialDecryptError) as moved:
            await store.kv_get("kv1", ["pre-key:8"])
        assert b"pre-key-material" not in str(moved.value).encode()
    finally:
        await store.delete_session("kv1")
        await store.close()


@pytest.mark.redis
async def test_redis_values_rotate_keys(shared_redis: RedisServer) -> None:
    old = CredentialCipher({"k1": bytes([1]) * 32}, "k1")
    both = CredentialCipher({"k2": bytes([2]) * 32, "k1": bytes([1]) * 32}, "k2")
    first = RedisStore.from_url(shared_redis.url, cipher=old, key_prefix="kvrot")
    rotated = RedisStore.from_url(shared_redis.url, cipher=both, key_prefix="kvrot")
    try:
        await first.kv_set("s1", {"creds": SECRET})
        assert await rotated.kv_get("s1", ["creds"]) == {"creds": SECRET}
        await rotated.kv_set("s1", {"creds": SECRET})
        sealed = await rotated.client.hget(rotated.keys.kv("s1"), "creds")
        assert isinstance(sealed, bytes) and CredentialCipher.key_id_of(sealed) == "k2"
    finally:
        await first.delete_session("s1")
        await first.close()
        await rotated.close()


def _all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.glob("broker.db*")) if p.is_file())


async def test_the_sqlite_file_holds_no_plaintext_value(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "broker.db")
    try:
        await store.kv_set("s1", {"creds": SECRET, "pre-key:7": b"pre-key-material-77"})
        assert await store.kv_get("s1", ["creds"]) == {"creds": SECRET}
    finally:
        await store.close()
    raw = _all_bytes(tmp_path)
    assert b"secret-key-material" not in raw and b"c2VjcmV0LWtleS1tYXRlcmlh" not in raw
    assert b"pre-key-material-77" not in raw
    reopened = open_sqlite(tmp_path / "broker.db")
    try:
        assert await reopened.kv_get("s1", ["creds", "pre-key:7"]) == {
            "creds": SECRET, "pre-key:7": b"pre-key-material-77"}
    finally:
        await reopened.close()


# -- sent messages, for an engine's retry requests -----------------------------------


async def test_a_sent_message_is_readable_by_id_before_and_after_its_ack(store: Store) -> None:
    await store.create_session(SessionRecord("s1", "t1"))
    accepted = await store.enqueue("s1", "+4915100000001", "hello there", "key-1",
                                   max_depth=10, at=1.0)
    mid = accepted.message.message_id
    unacked = await store.sent_message("s1", mid)
    assert unacked is not None and (unacked.to, unacked.body) == ("+4915100000001",
                                                                  "hello there")
    await mark_acked(store, "s1", mid, 2.0)
    acked = await SessionKV(store, "s1", None).sent_message(mid)
    assert acked == unacked
    assert await store.sent_message("s1", "m-unknown") is None
    assert await store.sent_message("s2", mid) is None


@pytest.mark.redis
async def test_a_sent_message_expires_with_the_retention_on_redis(backend: Backend) -> None:
    if backend.name != "redis":
        pytest.skip("the Redis store's TTL; SQLite sweeps in batches, memory keeps by count")
    store = await backend.fresh(idempotency_ttl_s=0.3)
    accepted = await store.enqueue("s1", "+1", "short-lived", "k", max_depth=10, at=1.0)
    mid = accepted.message.message_id
    await mark_acked(store, "s1", mid, 2.0)
    assert await store.sent_message("s1", mid) is not None
    for _ in range(200):  # bounded: 0.3 s TTL, up to 10 s
        if await store.sent_message("s1", mid) is None:
            break
        await asyncio.sleep(0.05)
    assert await store.sent_message("s1", mid) is None
