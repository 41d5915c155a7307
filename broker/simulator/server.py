"""A fake upstream network speaking docs/protocol.md, misbehaving on command.

Tests, the demo and the benchmarks need an upstream that pairs, kicks, bans,
times out, drops and loses acks on purpose, and that records what it got so
exactly-once, in-order delivery and conflicts can be asserted. Every state
change happens synchronously on the event loop (no awaits in between), so a
control command is in force as soon as it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from types import TracebackType
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from broker.content import Content, to_wire
from broker.lifecycle.reasons import DisconnectCode
from broker.simulator import commands
from broker.simulator.commands import ControlError
from broker.simulator.connection import (
    Conn,
    ConnState,
    close_text,
    has_corrupt_credentials,
    truncate,
)
from broker.simulator.logins import load_logins, save_logins
from broker.simulator.record import AcceptedMessage, LoginRecord, Overlap, PresenceSeen
from broker.upstream.protocol import (
    CLOSE_CODE_BASE,
    CONNECT_PATH,
    MAX_SEND_FRAME_BYTES,
    Ack,
    Error,
    Frame,
    Hello,
    InboundAck,
    Logout,
    Message,
    Paired,
    PairingCode,
    PairingCodeRequest,
    Ping,
    Pong,
    PresenceUpdate,
    ProtocolError,
    Qr,
    Ready,
    Receipt,
    Refused,
    Send,
    decode,
    encode,
)

log = logging.getLogger(__name__)

_POLL_S = 0.01
_CLOSE_TIMEOUT_S = 2.0


_PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTVWXYZ0123456789"
"""Pairing codes read aloud and typed: no I, O or U."""


@dataclass(frozen=True)
class SimulatorConfig:
    idle_timeout_s: float = 20.0
    qr_interval_s: float = 20.0
    qr_max: int = 5
    ack_delay_s: float = 0.0
    receipt_delay_s: float = 0.05
    seed: int | None = None
    state_path: str | None = None
    """A JSON file keeping the paired logins (their tokens) and bans across restarts,
    as a real upstream keeps them; None: forget everything on exit. What the
    simulator received (`record`) is per run either way."""


@dataclass(frozen=True)
class Faults:
    """Faults switched on by set_faults(); the defaults mean no faults."""

    drop_min_s: float | None = None
    drop_max_s: float | None = None
    latency_ms: float = 0.0
    lose_acks: float = 0.0
    drop_media: int = 0
    """Drop the connection (no close frame, nothing accepted) on each of the next this
    many send frames that carry a medium: a connection lost mid-upload."""


@dataclass(frozen=True)
class Unavailable:
    """Refuse the next `count` hellos with an error frame and close 4000+code."""

    code: int = 503
    count: int = 0
    retry_after_ms: int | None = None


class Simulator:
    """The fake upstream: websocket endpoint, control methods and HTTP control."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._rng = random.Random(self.config.seed)
        self._server: Server | None = None
        self._host = "127.0.0.1"
        self._conn_ids = itertools.count(1)
        self._inbound_ids = itertools.count(1)
        self._conns: set[Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._drop_task: asyncio.Task[None] | None = None
        self._tokens: dict[str, str] = {}
        self._banned: set[str] = set()
        self._records: dict[str, LoginRecord] = {}
        self._accepted: dict[str, set[str]] = {}
        self._media: dict[tuple[str, str], bytes] = {}
        """(login, message id) -> the medium accepted with it."""
        self._inbox: dict[str, dict[str, Message]] = {}
        self._open: dict[str, Conn] = {}
        self._pairing: dict[str, Conn] = {}
        self._pairing_codes: dict[str, Conn] = {}
        """Pairing code handed out -> the pairing connection it links when entered."""
        self._unavailable = Unavailable()
        self._faults = Faults()
        self._refusals: dict[str, tuple[int, str]] = {}
        """Login -> the (code, reason) its next new message is refused with."""
        if self.config.state_path is not None:
            self._tokens, self._banned = load_logins(self.config.state_path)

    def _save_logins(self) -> None:
        if self.config.state_path is not None:
            save_logins(self.config.state_path, self._tokens, self._banned)

    # -- lifecycle ---------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._host = host
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=functools.partial(commands.respond, self),
            ping_interval=None,  # keep-alive is the client's job (application pings)
            close_timeout=_CLOSE_TIMEOUT_S,
            max_size=MAX_SEND_FRAME_BYTES,  # send frames may carry a medium
        )
        self._restart_drops()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._cancel_drops()
        server.close()
        await server.wait_closed()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def _url_host(self) -> str:
        host = self._host if self._host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    @property
    def url(self) -> str:
        return f"ws://{self._url_host}:{self.port}{CONNECT_PATH}"

    @property
    def control_url(self) -> str:
        return f"http://{self._url_host}:{self.port}"

    # -- control -----------------------------------------------------------

    async def scan(self, login: str) -> bool:
        """Scan login's current QR: hand out credentials, then demand a restart."""
        conn = self._pairing.get(login)
        if conn is None or conn.state is not ConnState.PAIRING:
            return False
        return await self._pair(conn, login)

    async def enter_code(self, code: str) -> str | None:
        """Type a pairing code into the "phone": pairs the connection that asked for
        it, as a scan would. Returns the login it paired, None for an unknown code
        or one whose connection no longer pairs."""
        conn = self._pairing_codes.pop(code.strip().upper().replace("-", ""), None)
        if conn is None or conn.login is None or conn.state is not ConnState.PAIRING:
            return None
        login = conn.login
        return login if await self._pair(conn, login) else None

    def _pairing_code(self, conn: Conn, phone: str) -> PairingCode | str:
        """A new 8-character code for a pairing connection, or why there is none."""
        if conn.state is not ConnState.PAIRING:
            return "not pairing"
        if not phone.startswith("+") or not phone[1:].isdigit():
            return "phone number is not E.164"
        code = "".join(secrets.choice(_PAIRING_ALPHABET) for _ in range(8))
        self._pairing_codes[code] = conn
        assert conn.login is not None
        self.record(conn.login).pairing_codes.append(phone)
        return PairingCode(id=0, code=code)

    async def _pair(self, conn: Conn, login: str) -> bool:
        token = secrets.token_urlsafe(24)
        self._tokens[login] = token
        self._save_logins()
        self._detach(conn)
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(encode(Paired(credentials={"token": token})))
        self._close_soon(conn, DisconnectCode.RESTART_REQUIRED)
        return True

    async def logout(self, login: str) -> None:
        self._revoke(login)
        conn = self._open.get(login)
        if conn is not None:
            self._close_soon(conn, DisconnectCode.LOGGED_OUT)

    async def ban(self, login: str) -> None:
        self._banned.add(login)
        self._save_logins()
        for conn in (self._open.get(login), self._pairing.get(login)):
            if conn is not None:
                self._close_soon(conn, DisconnectCode.FORBIDDEN)

    async def unban(self, login: str) -> None:
        self._banned.discard(login)
        self._save_logins()

    async def drop(self, login: str, code: int = 428) -> bool:
        """Close login's connection with 4000+code; 428 aborts TCP with no close frame."""
        if not 0 <= code < 1000:
            raise ControlError("code must be between 0 and 999")
        conn = self._open.get(login) or self._pairing.get(login)
        if conn is None:
            return False
        self.record(login).drops += 1
        if code == DisconnectCode.CONNECTION_CLOSED:
            self._abort(conn)
        else:
            self._close_soon(conn, code)
        return True

    def set_unavailable(
        self, code: int = 503, count: int = 1, retry_after_ms: int | None = None
    ) -> None:
        if code not in (DisconnectCode.UNAVAILABLE, DisconnectCode.RATE_LIMITED):
            raise ControlError("code must be 503 or 429")
        if count < 0:
            raise ControlError("count must not be negative")
        if retry_after_ms is not None and retry_after_ms < 0:
            raise ControlError("retry_after_ms must not be negative")
        self._unavailable = Unavailable(code, count, retry_after_ms)

    @property
    def faults(self) -> Faults:
        """The faults in force (set_faults)."""
        return self._faults

    def set_faults(
        self,
        *,
        drop_min_s: float | None = None,
        drop_max_s: float | None = None,
        latency_ms: float = 0.0,
        lose_acks: float = 0.0,
        drop_media: int = 0,
    ) -> None:
        """Replace the fault set; one drop bound alone means a fixed interval."""
        if drop_min_s is None:
            drop_min_s = drop_max_s
        if drop_max_s is None:
            drop_max_s = drop_min_s
        if drop_min_s is not None and drop_max_s is not None and not (
            0 < drop_min_s <= drop_max_s
        ):
            raise ControlError("need 0 < drop_min_s <= drop_max_s")
        if latency_ms < 0:
            raise ControlError("latency_ms must not be negative")
        if not 0.0 <= lose_acks <= 1.0:
            raise ControlError("lose_acks must be between 0 and 1")
        if drop_media < 0:
            raise ControlError("drop_media must not be negative")
        self._faults = Faults(drop_min_s, drop_max_s, latency_ms, lose_acks, drop_media)
        self._restart_drops()

    def refuse_next(self, login: str, code: int, reason: str) -> None:
        """Refuse the login's next new message with `code` (as WhatsApp's 463 would)."""
        self._refusals[login] = (code, reason)

    async def receipt(self, login: str, message_id: str, status: str) -> bool:
        """Send a receipt ("delivered", "read", "played") for an accepted message on
        the login's open connection; False if the message is unknown or none is open."""
        conn = self._open.get(login)
        if conn is None or message_id not in self._accepted.get(login, set()):
            return False
        self.record(login).receipts.append((message_id, status))
        conn.outbox.put(encode(Receipt(id=message_id, status=status)), self._answer_delay())
        return True

    async def inbound(
        self, login: str, sender: str, body: str, content: Content | None = None
    ) -> str:
        """Queue an inbound message; it is (re)delivered on each ready until acked. A
        medium in `content` goes inline with the message, and `media(login, id)`
        answers its bytes, as for one accepted with a send."""
        message = Message(
            id=f"i-{next(self._inbound_ids)}", sender=sender, body=body, ts=time.time(),
            content=content,
        )
        if content is not None and content.media is not None:
            self._media[(login, message.id)] = content.media.data
        self._inbox.setdefault(login, {})[message.id] = message
        conn = self._open.get(login)
        if conn is not None:
            conn.outbox.put(encode(message), self._answer_delay())
        return message.id

    def record(self, login: str) -> LoginRecord:
        """The live record of login (created empty on first use)."""
        return self._records.setdefault(login, LoginRecord())

    def media(self, login: str, message_id: str) -> bytes | None:
        """The medium accepted with a message, or sent with an inbound one (None: no
        such message, or no medium)."""
        return self._media.get((login, message_id))

    def live_connections(self, login: str) -> int:
        return sum(1 for c in self._conns if c.login == login and c.state is ConnState.OPEN)

    def reset(self) -> None:
        """Forget every login, record and fault; every connection is closed 4428."""
        for conn in list(self._conns):
            self._close_soon(conn, DisconnectCode.CONNECTION_CLOSED)
        self._tokens.clear()
        self._banned.clear()
        self._records.clear()
        self._accepted.clear()
        self._media.clear()
        self._inbox.clear()
        self._pairing_codes.clear()
        self._unavailable = Unavailable()
        self._faults = Faults()
        self._refusals.clear()
        self._cancel_drops()
        self._save_logins()

    def issue_credentials(self, login: str) -> dict[str, Any]:
        """Register login as already paired (tests skip the QR dance)."""
        token = secrets.token_urlsafe(24)
        self._tokens[login] = token
        self._save_logins()
        return {"token": token}

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10.0
    ) -> None:
        """Poll predicate until true; arbitrary predicates have no event to wait on."""
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(_POLL_S)

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot for operators (/control/state)."""
        logins = sorted(
            set(self._tokens) | self._banned | set(self._records) | set(self._inbox)
            | {c.login for c in self._conns if c.login is not None}
        )
        return {
            "url": self.url if self._server is not None else None,
            "logins": {
                login: {
                    "paired": login in self._tokens,
                    "banned": login in self._banned,
                    "live_connections": self.live_connections(login),
                    "pairing": login in self._pairing,
                    "pending_inbound": len(self._inbox.get(login, {})),
                    "accepted": len(self.record(login).accepted),
                    "connection_attempts": self.record(login).connection_attempts,
                    "conflicts": self.record(login).conflicts,
                    "duplicates": self.record(login).duplicates,
                    "drops": self.record(login).drops,
                }
                for login in logins
            },
            "connections": len(self._conns),
            "unavailable": asdict(self._unavailable),
            "faults": asdict(self._faults),
        }

    # -- websocket conversation -------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        conn = Conn(ws, f"c-{next(self._conn_ids)}")
        self._conns.add(conn)
        self._spawn(conn, conn.outbox.run())
        try:
            await self._converse(conn)
        except ConnectionClosed:
            pass
        except Exception:
            # One broken conversation must never take the simulator down.
            log.exception("simulator connection %s failed", conn.id)
            self._abort(conn)
        finally:
            self._detach(conn)
            self._conns.discard(conn)
            for overlap, began in conn.overlapped:
                overlap.seconds = time.monotonic() - began
            for task in conn.tasks:
                task.cancel()

    async def _converse(self, conn: Conn) -> None:
        frame = await self._receive(conn, self.config.idle_timeout_s)
        if frame is None:
            return
        if not isinstance(frame, Hello):
            await self._close(conn, DisconnectCode.BAD_FRAME, f"expected hello, got {frame.type}")
            return
        await self._greet(conn, frame)
        while not conn.closing:
            # Pairing is bounded by the QR limit, not by the idle timeout.
            idle = self.config.idle_timeout_s if conn.state is ConnState.OPEN else None
            frame = await self._receive(conn, idle)
            if frame is None or conn.closing:
                return
            await self._dispatch(conn, frame)

    async def _receive(self, conn: Conn, timeout_s: float | None) -> Frame | None:
        """The next frame, or None once the connection was closed for cause."""
        try:
            async with asyncio.timeout(timeout_s):
                raw = await conn.ws.recv()
        except TimeoutError:
            await self._close(conn, DisconnectCode.TIMED_OUT, "no frame within the idle timeout")
            return None
        try:
            return decode(raw, max_bytes=MAX_SEND_FRAME_BYTES)
        except ProtocolError as exc:
            if has_corrupt_credentials(raw):
                await self._close(conn, DisconnectCode.BAD_SESSION, "corrupt credentials")
            else:
                await self._close(conn, DisconnectCode.BAD_FRAME, str(exc))
            return None

    async def _greet(self, conn: Conn, hello: Hello) -> None:
        await self._latency()
        if conn.closing:  # reset() or stop() came first
            return
        login = conn.login = hello.login
        conn.client = hello.client
        record = self.record(login)
        record.connection_attempts += 1
        record.clients[conn.id] = hello.client
        if not login:
            await self._close(conn, DisconnectCode.BAD_FRAME, "empty login")
            return
        if self._unavailable.count > 0:
            await self._refuse(conn)
            return
        if login in self._banned:
            await self._close(conn, DisconnectCode.FORBIDDEN)
            return
        if hello.credentials is None:
            conn.state = ConnState.PAIRING
            self._pairing[login] = conn  # the newest pairing connection is the one scanned
            self._spawn(conn, self._show_qr_codes(conn, record))
            return
        token = hello.credentials.get("token")
        if not isinstance(token, str):
            await self._close(conn, DisconnectCode.BAD_SESSION, "corrupt credentials")
            return
        expected = self._tokens.get(login)
        if expected is None or not secrets.compare_digest(token.encode(), expected.encode()):
            await self._close(conn, DisconnectCode.LOGGED_OUT, "credentials unknown or revoked")
            return
        # Counted before the older connection is closed: that close is the upstream's
        # answer to the overlap, not proof that there was none.
        record.max_concurrent = max(record.max_concurrent, self.live_connections(login) + 1)
        previous = self._open.get(login)
        if previous is not None:
            record.conflicts += 1
            overlap = Overlap(previous.client, conn.client, previous.id, conn.id)
            record.overlaps.append(overlap)
            previous.overlapped.append((overlap, time.monotonic()))
            self._close_soon(previous, DisconnectCode.REPLACED)
        conn.state = ConnState.OPEN
        self._open[login] = conn
        conn.outbox.put(encode(Ready(login=login, connection_id=conn.id)))
        for message in self._inbox.get(login, {}).values():
            conn.outbox.put(encode(message))

    async def _refuse(self, conn: Conn) -> None:
        u = self._unavailable
        self._unavailable = Unavailable(u.code, u.count - 1, u.retry_after_ms)
        text = close_text(u.code)
        await conn.ws.send(encode(Error(code=u.code, reason=text, retry_after_ms=u.retry_after_ms)))
        await self._close(conn, u.code, text)

    async def _show_qr_codes(self, conn: Conn, record: LoginRecord) -> None:
        interval = self.config.qr_interval_s
        for index in range(1, self.config.qr_max + 1):
            if conn.state is not ConnState.PAIRING:
                return
            code = f"2@{secrets.token_urlsafe(24)},{secrets.token_urlsafe(16)}"
            qr = Qr(code=code, index=index, expires_in_ms=int(interval * 1000))
            await conn.ws.send(encode(qr))
            record.qr_codes_sent += 1
            await asyncio.sleep(interval)
        if conn.state is ConnState.PAIRING:
            await self._close(conn, DisconnectCode.TIMED_OUT, "pairing timed out")

    async def _dispatch(self, conn: Conn, frame: Frame) -> None:
        assert conn.login is not None
        login = conn.login
        is_open = conn.state is ConnState.OPEN
        match frame:
            case Ping(id=ping_id):
                self.record(login).pings += 1
                conn.outbox.put(encode(Pong(id=ping_id)), self._answer_delay())
            case Send() if is_open:
                if frame.content is not None and frame.content.media is not None and \
                        self._faults.drop_media > 0:
                    self._faults = replace(self._faults, drop_media=self._faults.drop_media - 1)
                    self.record(login).media_drops += 1
                    self.record(login).drops += 1
                    self._abort(conn)
                    return
                self._accept(conn, login, frame)
            case PresenceUpdate(to=to, presence=presence) if is_open:
                self.record(login).presence.append(PresenceSeen(to, str(presence), conn.id))
            case InboundAck(id=inbound_id) if is_open:
                if self._inbox.get(login, {}).pop(inbound_id, None) is not None:
                    self.record(login).inbound_acked.append(inbound_id)
            case Logout() if is_open:
                self._revoke(login)
                await self._close(conn, DisconnectCode.LOGGED_OUT)
            case PairingCodeRequest(id=rid, phone=phone):
                made = self._pairing_code(conn, phone)
                answer = PairingCode(id=rid, reason=made) if isinstance(made, str) else \
                    PairingCode(id=rid, code=made.code)
                conn.outbox.put(encode(answer), self._answer_delay())
            case _:
                await self._close(conn, DisconnectCode.BAD_FRAME, f"unexpected {frame.type} frame")

    def _accept(self, conn: Conn, login: str, send: Send) -> None:
        record = self.record(login)
        seen = self._accepted.setdefault(login, set())
        duplicate = send.id in seen
        refusal = None if duplicate else self._refusals.pop(login, None)
        if refusal is not None:
            record.refused.append(send.id)
            conn.outbox.put(encode(Refused(id=send.id, code=refusal[0], reason=refusal[1])),
                            self._answer_delay())
            return
        if duplicate:
            record.duplicates += 1
        else:
            seen.add(send.id)
            content = None
            if send.content is not None:
                content = to_wire(send.content)
                if send.content.media is not None:
                    data = send.content.media.data
                    self._media[(login, send.id)] = data
                    content["media"] = {**content["media"], "data": None, "bytes": len(data),
                                        "sha256": hashlib.sha256(data).hexdigest()}
            record.accepted.append(
                AcceptedMessage(send.id, send.to, send.body, conn.id, content))
        if self._faults.lose_acks and self._rng.random() < self._faults.lose_acks:
            return  # accepted, but the client never hears about it
        delay = self._answer_delay()
        conn.outbox.put(encode(Ack(id=send.id, duplicate=duplicate)), delay)
        if self.config.receipt_delay_s > 0:
            conn.outbox.put(encode(Receipt(id=send.id)), delay + self.config.receipt_delay_s)

    # -- closing -----------------------------------------------------------

    def _revoke(self, login: str) -> None:
        self._tokens.pop(login, None)
        self._save_logins()
        self.record(login).logouts += 1

    def _detach(self, conn: Conn) -> None:
        """Mark conn closing and forget it as login's live or pairing connection."""
        conn.state = ConnState.CLOSING
        if conn.login is not None:
            if self._open.get(conn.login) is conn:
                del self._open[conn.login]
            if self._pairing.get(conn.login) is conn:
                del self._pairing[conn.login]
        for code in [c for c, owner in self._pairing_codes.items() if owner is conn]:
            del self._pairing_codes[code]

    async def _close(self, conn: Conn, code: int, reason: str | None = None) -> None:
        self._detach(conn)
        await conn.ws.close(CLOSE_CODE_BASE + code, truncate(reason or close_text(code)))

    def _close_soon(self, conn: Conn, code: int, reason: str | None = None) -> None:
        """Close from outside conn's handler without waiting for the handshake."""
        self._detach(conn)
        reason = truncate(reason or close_text(code))
        self._spawn(None, conn.ws.close(CLOSE_CODE_BASE + code, reason))

    def _abort(self, conn: Conn) -> None:
        """Drop like a dead network: no close frame, the client sees 1006."""
        self._detach(conn)
        conn.ws.transport.abort()

    # -- faults ------------------------------------------------------------

    def _answer_delay(self) -> float:
        return self.config.ack_delay_s + self._faults.latency_ms / 1000

    async def _latency(self) -> None:
        delay = self._answer_delay()
        if delay > 0:
            await asyncio.sleep(delay)

    def _cancel_drops(self) -> None:
        if self._drop_task is not None:
            self._drop_task.cancel()
            self._drop_task = None

    def _restart_drops(self) -> None:
        self._cancel_drops()
        low, high = self._faults.drop_min_s, self._faults.drop_max_s
        if self._server is not None and low is not None and high is not None:
            self._drop_task = asyncio.get_running_loop().create_task(self._drop_forever(low, high))

    async def _drop_forever(self, low: float, high: float) -> None:
        while True:
            await asyncio.sleep(self._rng.uniform(low, high))
            for login, conn in list(self._open.items()):
                self.record(login).drops += 1
                self._abort(conn)

    def _spawn(self, conn: Conn | None, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task that stop() (and conn's end, if given) cancels."""
        task = asyncio.get_running_loop().create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if conn is not None:
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)

    @staticmethod
    async def _guard(coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("simulator background task failed")
