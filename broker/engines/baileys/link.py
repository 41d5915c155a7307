"""The broker's side of one session link to the bridge (docs/bridge-protocol.md).

`BridgeProvider.connect` opens a Unix-socket connection to the bridge per
session link, says hello with the per-start secret, and returns a
`BridgeLink`. The link turns bridge frames into `UpstreamEvent`s and answers
the bridge's requests for the session's auth state (`kv_get` / `kv_set` /
`kv_clear`, through the owner-fenced `SessionKV`) and for sent messages
(`get_message`), one at a time and in order, so a later write never
overtakes an earlier one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from broker import content as contents
from broker.content import Presence, to_wire
from broker.content import decode as decode_content
from broker.lifecycle.reasons import DisconnectCode, parse_code
from broker.store.base import OutboxMessage
from broker.store.kv import SessionKV
from broker.upstream import events as ev
from broker.upstream.protocol import MAX_WIRE_MEDIA_BYTES
from broker.upstream.provider import ConnectError, Outgoing, PairingUnavailable

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_LINE = 8 * 1024 * 1024
PAIRING_CODE_TIMEOUT_S = 15.0

Frame = dict[str, Any]


def encode(frame: Frame) -> bytes:
    return json.dumps(frame, separators=(",", ":")).encode() + b"\n"


def _is_text(message: OutboxMessage) -> bool:
    """Whether a sent message is text (a retry can be answered with its body); a medium
    would need the uploaded media message, which the broker does not keep."""
    if message.content is None:
        return True
    try:
        return decode_content(message.content).kind is None
    except ValueError:
        return False


class BridgeLink:
    """One session's connection to the bridge, i.e. one Baileys socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 kv: SessionKV) -> None:
        self._reader = reader
        self._writer = writer
        self._kv = kv
        self._requests: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._serving = asyncio.create_task(self._serve_requests())
        self._codes: dict[int, asyncio.Future[Frame]] = {}
        self._rids = itertools.count(1)
        self._local_close: tuple[DisconnectCode, str] | None = None

    # -- events --

    async def events(self) -> AsyncIterator[ev.UpstreamEvent]:
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except (OSError, ValueError):  # reset, or a line over the limit
                    line = b""
                if not line:
                    yield self._lost()
                    return
                try:
                    frame = json.loads(line)
                except ValueError:
                    yield self._lost("bad frame from the bridge")
                    return
                if not isinstance(frame, dict):
                    continue
                if frame.get("t") in ("kv_get", "kv_set", "kv_clear", "get_message"):
                    self._requests.put_nowait(frame)
                    continue
                try:
                    event = self._translate(frame)
                except (KeyError, TypeError, ValueError) as exc:  # the bridge's bug
                    yield self._lost(f"bad {str(frame.get('t'))[:20]} frame from the bridge: "
                                     f"{str(exc)[:200]}")
                    return
                if event is not None:
                    yield event
                    if isinstance(event, ev.Disconnected):
                        return
        finally:
            self._finish()

    def _translate(self, f: Frame) -> ev.UpstreamEvent | None:
        match f.get("t"):
            case "qr":
                return ev.QrCode(str(f["code"]), int(f["index"]), int(f["expires_in_ms"]))
            case "paired":
                # The auth state itself is in the kv area; this only marks the login paired.
                return ev.Paired({"engine": "baileys", "me": str(f.get("me", ""))})
            case "open":
                return ev.Ready(str(f.get("me") or ""))
            case "ack":
                return ev.Acked(str(f["id"]), False)
            case "delivered" | "read" | "played":
                return ev.Receipt(str(f["id"]), str(f["t"]))
            case "pong":
                return ev.Pong(int(f["id"]))
            case "inbound":
                content = None
                if f.get("content") is not None:
                    # A medium's bytes come with it (the bridge downloaded them).
                    try:
                        content = contents.from_wire(f["content"], MAX_WIRE_MEDIA_BYTES,
                                                     inbound=True)
                    except ValueError as exc:  # the bridge's bug: keep the message itself
                        log.warning("inbound %s: content off-spec, kept as text: %s",
                                    str(f.get("id"))[:80], exc)
                return ev.Inbound(str(f["id"]), str(f.get("sender", "")), str(f.get("body", "")),
                                  float(f.get("ts") or 0), str(f.get("lid") or "")[:200],
                                  str(f.get("push_name") or "")[:200],
                                  str(f.get("chat") or "")[:200], content=content)
            case "failed":
                code = f.get("code")
                return ev.Refused(str(f["id"]), code if isinstance(code, int) else 0,
                                  str(f.get("reason") or "WhatsApp refused the message")[:500])
            case "close":
                if self._local_close is not None:
                    return ev.Disconnected(*self._local_close)
                return ev.Disconnected(parse_code(int(f.get("code", 428))),
                                       str(f.get("reason", "")) or "connection closed")
            case "error":
                return ev.Disconnected(DisconnectCode.CONNECTION_CLOSED,
                                       f"bridge refused the link: {f.get('reason', '')}")
            case "reply":
                waiter = self._codes.pop(int(f.get("rid", 0)), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(f)
                return None
            case _:
                return None

    def _lost(self, why: str = "") -> ev.Disconnected:
        if self._local_close is not None:
            return ev.Disconnected(*self._local_close)
        return ev.Disconnected(DisconnectCode.CONNECTION_CLOSED,
                               why or "lost the WhatsApp bridge (it exited or restarted)")

    def _finish(self) -> None:
        self._requests.put_nowait(None)
        for waiter in self._codes.values():
            if not waiter.done():
                waiter.set_exception(PairingUnavailable("the connection closed"))
        self._codes.clear()
        self._writer.close()

    # -- the bridge's requests: auth state and sent messages --

    async def _serve_requests(self) -> None:
        while (frame := await self._requests.get()) is not None:
            reply: Frame = {"t": "reply", "rid": frame.get("rid")}
            try:
                reply.update(await self._answer(frame))
            except Exception as exc:  # NotOwner, store down: the bridge ends the socket
                reply["error"] = type(exc).__name__
            self._write(reply)

    async def _answer(self, f: Frame) -> Frame:
        match f["t"]:
            case "kv_get":
                found = await self._kv.get([str(k) for k in f.get("keys", [])])
                return {"values": {k: v.decode() for k, v in found.items()}}
            case "kv_set":
                values: dict[str, bytes | None] = {
                    str(k): None if v is None else str(v).encode()
                    for k, v in dict(f.get("values", {})).items()}
                await self._kv.set(values)
                return {}
            case "kv_clear":
                await self._kv.clear()
                return {}
            case _:  # get_message
                sent = await self._kv.sent_message(str(f.get("id", "")))
                return {"body": sent.body if sent is not None and _is_text(sent) else None}

    # -- commands --

    def _write(self, frame: Frame) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode(frame))

    async def send(self, messages: Sequence[Outgoing]) -> None:
        if self._writer.is_closing():
            return
        lines = []
        for message in messages:
            frame: Frame = {"t": "send", "id": message.message_id, "to": message.to,
                            "body": message.body}
            if message.content is not None:
                # the protocol-v1 form: media as base64
                frame["content"] = to_wire(message.content)
            lines.append(encode(frame))
        self._writer.write(b"".join(lines))  # one write for the whole burst

    async def send_presence(self, chat: str, presence: Presence) -> None:
        self._write({"t": "presence", "to": chat, "presence": str(presence)})

    async def ping(self, ping_id: int) -> None:
        self._write({"t": "ping", "id": ping_id})

    async def logout(self) -> None:
        self._write({"t": "logout"})

    async def ack_inbound(self, message_id: str) -> None:
        """Nothing to do: Baileys acknowledges inbound stanzas to WhatsApp itself."""

    async def request_pairing_code(self, phone_number: str) -> str:
        rid = next(self._rids)
        waiter: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._codes[rid] = waiter
        self._write({"t": "pair_code", "rid": rid, "phone": phone_number})
        try:
            async with asyncio.timeout(PAIRING_CODE_TIMEOUT_S):
                answer = await waiter
        except TimeoutError:
            raise PairingUnavailable("WhatsApp did not answer the pairing code request "
                                     "in time") from None
        finally:
            self._codes.pop(rid, None)
        code = answer.get("code")
        if not code:
            raise PairingUnavailable(str(answer.get("error") or "WhatsApp gave no pairing code"))
        return str(code)

    async def close(self, code: DisconnectCode, reason: str) -> None:
        self._local_close = (code, reason)
        self._write({"t": "close"})
        with contextlib.suppress(OSError):
            await self._writer.drain()
        self._writer.close()

    def abort(self) -> None:
        self._local_close = (DisconnectCode.CONNECTION_CLOSED, "lease lost: connection dropped")
        self._writer.transport.abort()


class BridgeProvider:
    """Opens session links on the bridge that `bridge()` describes right now."""

    def __init__(self, bridge: Callable[[], tuple[str, str] | str],
                 *, connect_timeout_s: float = 10.0) -> None:
        """`bridge()`: (socket path, secret) while the bridge is up, else why it is not."""
        self._bridge = bridge
        self.connect_timeout_s = connect_timeout_s

    async def connect(self, login: str, credentials: dict[str, Any] | None,
                      kv: SessionKV) -> BridgeLink:
        where = self._bridge()
        if isinstance(where, str):
            raise ConnectError(DisconnectCode.CONNECTION_CLOSED, where)
        path, secret = where
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
            writer.write(encode({"t": "hello", "version": PROTOCOL_VERSION, "secret": secret,
                                 "session": login}))
            async with asyncio.timeout(self.connect_timeout_s):
                welcome = await reader.readline()
        except (OSError, TimeoutError) as exc:
            raise ConnectError(DisconnectCode.CONNECTION_CLOSED,
                               f"cannot reach the WhatsApp bridge: {exc}") from exc
        if not welcome.startswith(b'{"t":"welcome"'):
            writer.close()
            raise ConnectError(DisconnectCode.CONNECTION_CLOSED,
                               f"the WhatsApp bridge refused the link: {welcome[:200]!r}")
        return BridgeLink(reader, writer, kv)
