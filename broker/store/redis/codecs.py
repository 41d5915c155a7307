"""How the store's values look in Redis, and back: one place per value shape.

redis-py hands back bytes (or str, with decode_responses) and, depending on
the protocol version, stream replies as lists or dicts; these helpers absorb
both so the store code reads only typed values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from broker.lifecycle.states import State
from broker.store.base import (
    DeliveryResult,
    InboundOrigin,
    InboundRecord,
    LiveState,
    OutboxMessage,
    SessionRecord,
    StatusEvent,
    event_from_json,
    event_to_json,
)

__all__ = ["event_from_json", "event_to_json"]  # the stored event JSON, shared with SQLite

StreamRow = tuple[Any, Any]
"""One stream entry as redis-py returns it: (entry id, field mapping or None)."""


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def flag(value: bool) -> str:
    return "1" if value else "0"


def stream_rows(reply: Any) -> list[StreamRow]:
    """The entries of a one-stream XREAD/XREADGROUP reply ([] when none), in
    either reply shape: RESP2 ``[[name, rows]]`` or RESP3 ``{name: [rows]}``."""
    if not reply:
        return []
    if isinstance(reply, list):
        return list(reply[0][1])
    return list(next(iter(reply.values()))[0])


def autoclaim_reply(reply: Any) -> tuple[str, list[StreamRow]]:
    """XAUTOCLAIM's (next cursor, claimed entries); deleted entries come back without fields."""
    return text(reply[0]), list(reply[1])


# sessions
def session_record(session_id: str, raw: Mapping[Any, Any]) -> SessionRecord:
    data = fields(raw)
    return SessionRecord(
        session_id=session_id, tenant=data.get("tenant", ""),
        enabled=data.get("enabled", "1") == "1",
        created_at=float(data.get("created_at", "0") or 0),
    )


def session_from_flat(session_id: str, flat: Sequence[Any]) -> SessionRecord:
    """A session hash as a script returns it (HGETALL's flat field list)."""
    return session_record(session_id, dict(zip(flat[::2], flat[1::2], strict=True)))


# outbox
def outbox_entry(session_id: str, row: Sequence[bytes | str]) -> OutboxMessage:
    """An outbox stream entry, given as the flat field list the scripts return."""
    raw = {text(k): v for k, v in zip(row[::2], row[1::2], strict=True)}
    content = raw.pop("content", None)  # bytes as they are: not text
    f = {k: text(v) for k, v in raw.items()}
    return OutboxMessage(
        session_id=session_id, message_id=f["mid"], to=f["to"], body=f["body"],
        idempotency_key=f["key"], sequence=int(f["seq"]), accepted_at=float(f["at"]),
        content=None if content is None else as_bytes(content),
    )


def idem_record(session_id: str, key: str, raw: bytes | str) -> OutboxMessage:
    """The message an idempotency key names: the script's JSON [mid, to, body, seq, at]."""
    mid, to, body, seq, at = json.loads(raw)
    return OutboxMessage(
        session_id=session_id, message_id=mid, to=to, body=body, idempotency_key=key,
        sequence=int(seq), accepted_at=float(at),
    )


def delivery_result(message_id: str, raw: bytes | str) -> DeliveryResult:
    """A stored (or published) result, as APPLY_OUTBOX writes it: the ack time, then
    code and reason if refused ("1700000000.5" or "1700000000.5 463 <reason>")."""
    at, _, refused = text(raw).partition(" ")
    if not refused:
        return DeliveryResult(message_id, float(at))
    code, _, why = refused.partition(" ")
    return DeliveryResult(message_id, float(at), int(code), why or "refused")


# events and live state


def event_row(entry_id: bytes | str, raw: Mapping[Any, Any]) -> StatusEvent:
    """An event log entry: its JSON under field ``e``, its stream id as the event id."""
    return event_from_json(raw[b"e"] if b"e" in raw else raw["e"], text(entry_id))


def live_fields(live: LiveState) -> list[str]:
    """The live hash as the script's field/value arguments."""
    return ["state", live.state.value, "owner", live.owner,
            "activity", repr(live.last_activity), "at", repr(live.reported_at)]


def live_state(raw: Mapping[Any, Any]) -> LiveState:
    f = fields(raw)
    return LiveState(State(f["state"]), f["owner"], float(f["activity"]), float(f["at"]))


# inbound
def inbound_record(session_id: str, entry_id: bytes | str, raw: Mapping[Any, Any]) -> InboundRecord:
    content = raw.get(b"c", raw.get("c"))  # binary: not decoded as text
    f = {text(k): text(v) for k, v in raw.items() if k not in (b"c", "c")}
    return InboundRecord(
        session_id=session_id, inbound_id=text(entry_id), upstream_id=f["uid"],
        sender=f["from"], body=f["body"], received_at=float(f["at"]),
        origin=InboundOrigin.from_json(f.get("o")),
        content=as_bytes(content) if content else None,
    )
