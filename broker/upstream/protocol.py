"""Frames of the JSON-over-websocket upstream protocol (docs/protocol.md).

Pure encode/decode shared by the websocket provider and the simulator, so both
sides agree by construction and hostile input is rejected in one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from broker import content as contents
from broker.content import Content, Presence
from broker.lifecycle.reasons import DisconnectCode, parse_code

CONNECT_PATH = "/v1/connect"
CLOSE_CODE_BASE = 4000
MAX_FRAME_BYTES = 1 << 20
MAX_WIRE_MEDIA_BYTES = 64 << 20
"""The largest medium a send frame may carry (the cap of --max-media-bytes)."""
MAX_SEND_FRAME_BYTES = MAX_WIRE_MEDIA_BYTES * 4 // 3 + MAX_FRAME_BYTES
"""Frames that carry a base64 medium (send frames to the upstream, message frames from
it) may be this large; every other frame stays within MAX_FRAME_BYTES."""


class ProtocolError(ValueError):
    """A frame that does not follow docs/protocol.md."""


def close_code_for(code: DisconnectCode) -> int:
    return CLOSE_CODE_BASE + int(code)


def reason_for_close(close_code: int | None) -> DisconnectCode:
    """Websocket close code to disconnect reason; no close frame means 428."""
    if close_code is None or not CLOSE_CODE_BASE <= close_code < CLOSE_CODE_BASE + 1000:
        return DisconnectCode.CONNECTION_CLOSED
    return parse_code(close_code - CLOSE_CODE_BASE)


@dataclass(frozen=True)
class Hello:
    login: str
    credentials: dict[str, Any] | None = None
    client: str = ""
    """Who connects (the broker sends "broker/<instance id>"); informational only."""
    type: str = field(default="hello", init=False)


@dataclass(frozen=True)
class Ready:
    login: str
    connection_id: str
    type: str = field(default="ready", init=False)


@dataclass(frozen=True)
class Qr:
    code: str
    index: int
    expires_in_ms: int
    type: str = field(default="qr", init=False)


@dataclass(frozen=True)
class Paired:
    credentials: dict[str, Any]
    type: str = field(default="paired", init=False)


@dataclass(frozen=True)
class Error:
    code: int
    reason: str
    retry_after_ms: int | None = None
    type: str = field(default="error", init=False)


@dataclass(frozen=True)
class Send:
    id: str
    to: str
    body: str
    content: Content | None = None
    """Media, a location, a reaction, a quote, mentions (docs/protocol.md "Content");
    None (left out of the frame): `body` is plain text."""
    type: str = field(default="send", init=False)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "id": self.id, "to": self.to,
                               "body": self.body}
        if self.content is not None:
            out["content"] = contents.to_wire(self.content)
        return out


@dataclass(frozen=True)
class PresenceUpdate:
    """Client to upstream, best effort: what the session is doing in chat `to`."""

    to: str
    presence: Presence
    type: str = field(default="presence", init=False)


@dataclass(frozen=True)
class Ack:
    id: str
    duplicate: bool = False
    type: str = field(default="ack", init=False)


@dataclass(frozen=True)
class Refused:
    """The upstream will not take the message (sent instead of its ack)."""

    id: str
    code: int
    reason: str = ""
    type: str = field(default="refused", init=False)


@dataclass(frozen=True)
class Receipt:
    id: str
    status: str = "delivered"
    type: str = field(default="receipt", init=False)


@dataclass(frozen=True)
class Ping:
    id: int
    type: str = field(default="ping", init=False)


@dataclass(frozen=True)
class Pong:
    id: int
    type: str = field(default="pong", init=False)


@dataclass(frozen=True)
class Message:
    id: str
    sender: str
    body: str
    ts: float
    content: Content | None = None
    """Beyond text (docs/protocol.md "Content"): a medium with its bytes, a location,
    a reaction, the quoted message (`reply_to`), mentions."""
    type: str = field(default="message", init=False)

    def to_wire(self) -> dict[str, Any]:
        out = {"type": self.type, "id": self.id, "from": self.sender, "body": self.body,
               "ts": self.ts}
        if self.content is not None:
            out["content"] = contents.to_wire(self.content)
        return out


@dataclass(frozen=True)
class InboundAck:
    id: str
    type: str = field(default="inbound_ack", init=False)


@dataclass(frozen=True)
class Logout:
    type: str = field(default="logout", init=False)


@dataclass(frozen=True)
class PairingCodeRequest:
    """Client to upstream, while pairing: link by phone number instead of a QR scan."""

    id: int
    phone: str
    """E.164, with the leading '+'."""
    type: str = field(default="pairing_code_request", init=False)


@dataclass(frozen=True)
class PairingCode:
    """The upstream's answer to the request with the same id: an 8-character code,
    or an empty code and the reason it gave none."""

    id: int
    code: str = ""
    reason: str = ""
    type: str = field(default="pairing_code", init=False)


PAIRING_CODE_LENGTH = 8

Frame = (
    Hello | Ready | Qr | Paired | Error | Send | Ack | Refused | Receipt | Ping | Pong | Message
    | InboundAck | Logout | PairingCodeRequest | PairingCode | PresenceUpdate
)


def encode(frame: Frame) -> str:
    if isinstance(frame, Message | Send):
        return json.dumps(frame.to_wire())
    return json.dumps(asdict(frame))


def _str(obj: dict[str, Any], key: str, *, max_len: int = 65536) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"field {key!r} must be a string of at most {max_len} characters")
    return value


MAX_INT32 = 2**31 - 1
_INT64 = (-(2**63), 2**63 - 1)


def _int(
    obj: dict[str, Any], key: str, *, optional: bool = False, bounds: tuple[int, int] = _INT64
) -> int | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    # Bounded: a hostile 10**400 must not reach timers, floats or int32 proto fields.
    if not isinstance(value, int) or isinstance(value, bool) or \
            not bounds[0] <= value <= bounds[1]:
        raise ProtocolError(f"field {key!r} must be an integer in [{bounds[0]}, {bounds[1]}]")
    return value


def _req_int(obj: dict[str, Any], key: str, *, bounds: tuple[int, int] = _INT64) -> int:
    value = _int(obj, key, bounds=bounds)
    assert value is not None
    return value


MAX_CREDENTIALS_DEPTH = 32


def _nests_within(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests at most `limit` containers deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def _credentials(obj: dict[str, Any]) -> dict[str, Any] | None:
    value = obj.get("credentials")
    if value is not None and not isinstance(value, dict):
        raise ProtocolError("field 'credentials' must be an object or null")
    # json.loads takes ~1000 levels, but re-encoding them into the next hello
    # fails with RecursionError: the session could never connect again.
    if value is not None and not _nests_within(value, MAX_CREDENTIALS_DEPTH):
        raise ProtocolError(f"field 'credentials' nests deeper than {MAX_CREDENTIALS_DEPTH}")
    return value


def decode(raw: str | bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Parse one frame; raise ProtocolError on anything off-spec. `max_bytes`: the
    upstream side reads send frames carrying media up to MAX_SEND_FRAME_BYTES."""
    if isinstance(raw, bytes):
        if len(raw) > max_bytes:
            raise ProtocolError("frame too large")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("frame is not UTF-8") from exc
    if len(raw) > max_bytes:
        raise ProtocolError("frame too large")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("frame is not JSON") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("frame must be a JSON object")
    kind = obj.get("type")
    match kind:
        case "hello":
            client = obj.get("client", "")
            return Hello(login=_str(obj, "login", max_len=256), credentials=_credentials(obj),
                         client=client if isinstance(client, str) else "")
        case "ready":
            return Ready(login=_str(obj, "login", max_len=256),
                         connection_id=_str(obj, "connection_id", max_len=256))
        case "qr":
            return Qr(code=_str(obj, "code"), index=_req_int(obj, "index", bounds=(0, MAX_INT32)),
                      expires_in_ms=_req_int(obj, "expires_in_ms", bounds=(0, MAX_INT32)))
        case "paired":
            creds = _credentials(obj)
            if creds is None:
                raise ProtocolError("field 'credentials' must be an object")
            return Paired(credentials=creds)
        case "error":
            return Error(code=_req_int(obj, "code"), reason=_str(obj, "reason"),
                         retry_after_ms=_int(obj, "retry_after_ms", optional=True,
                                             bounds=(0, MAX_INT32)))
        case "send":
            content = None
            if obj.get("content") is not None:
                try:
                    content = contents.from_wire(obj["content"], MAX_WIRE_MEDIA_BYTES)
                except ValueError as exc:
                    raise ProtocolError(str(exc)[:200]) from None
            return Send(id=_str(obj, "id", max_len=256), to=_str(obj, "to", max_len=256),
                        body=_str(obj, "body", max_len=MAX_FRAME_BYTES), content=content)
        case "presence":
            try:
                presence = Presence(_str(obj, "presence", max_len=32))
            except ValueError:
                raise ProtocolError("field 'presence' must be available, composing, "
                                    "recording or paused") from None
            return PresenceUpdate(to=_str(obj, "to", max_len=256), presence=presence)
        case "ack":
            dup = obj.get("duplicate", False)
            if not isinstance(dup, bool):
                raise ProtocolError("field 'duplicate' must be a boolean")
            return Ack(id=_str(obj, "id", max_len=256), duplicate=dup)
        case "refused":
            return Refused(id=_str(obj, "id", max_len=256), code=_req_int(obj, "code"),
                           reason=_str(obj, "reason", max_len=1000) if "reason" in obj else "")
        case "receipt":
            return Receipt(id=_str(obj, "id", max_len=256), status=_str(obj, "status"))
        case "ping":
            return Ping(id=_req_int(obj, "id"))
        case "pong":
            return Pong(id=_req_int(obj, "id"))
        case "message":
            ts = obj.get("ts", 0.0)
            if not isinstance(ts, int | float) or isinstance(ts, bool) or \
                    not -1e15 < ts < 1e15:  # also NaN, inf and ints float() cannot hold
                raise ProtocolError("field 'ts' must be a finite number")
            content = None
            if obj.get("content") is not None:
                try:
                    content = contents.from_wire(obj["content"], MAX_WIRE_MEDIA_BYTES,
                                                 inbound=True)
                except ValueError as exc:
                    raise ProtocolError(str(exc)[:200]) from None
            return Message(id=_str(obj, "id", max_len=256), sender=_str(obj, "from", max_len=256),
                           body=_str(obj, "body", max_len=MAX_FRAME_BYTES), ts=float(ts),
                           content=content)
        case "inbound_ack":
            return InboundAck(id=_str(obj, "id", max_len=256))
        case "logout":
            return Logout()
        case "pairing_code_request":
            return PairingCodeRequest(id=_req_int(obj, "id"), phone=_str(obj, "phone", max_len=32))
        case "pairing_code":
            code = _str(obj, "code", max_len=PAIRING_CODE_LENGTH)
            if code and len(code) != PAIRING_CODE_LENGTH:
                raise ProtocolError(f"field 'code' must be {PAIRING_CODE_LENGTH} characters")
            reason = obj.get("reason", "")
            return PairingCode(id=_req_int(obj, "id"), code=code,
                               reason=reason[:256] if isinstance(reason, str) else "")
        case _:
            raise ProtocolError(f"unknown frame type {kind!r:.60}")  # bounded: may be 1 MB
