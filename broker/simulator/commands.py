"""The simulator's HTTP control endpoint (GET /control/<command>?...), server side:
strict parameter parsing and one handler per command, each a call on the
Simulator's public methods. The client side is broker.simulator.control."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from broker.content import Content, from_wire
from broker.upstream.protocol import CONNECT_PATH, MAX_WIRE_MEDIA_BYTES

if TYPE_CHECKING:
    from broker.simulator.server import Simulator


def generated_media(seed: int, size: int) -> bytes:
    """`size` pseudo-random bytes from `seed` (SHA-256 in counter mode): what the
    `inbound` command's `media_bytes` sends, so a test can tell the bytes it expects."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{block}".encode()).digest()
        block += 1
    return bytes(out[:size])


class ControlError(ValueError):
    """A control command with bad or missing parameters (HTTP 400)."""


async def respond(
    sim: Simulator, connection: ServerConnection, request: Request
) -> Response | None:
    """Answer a plain HTTP request on the websocket port: /control/<command>, or 404;
    None lets the websocket handshake of CONNECT_PATH go on."""
    url = urlsplit(request.path)
    if url.path == CONNECT_PATH:
        return None  # go on with the websocket handshake
    if url.path.startswith("/control/"):
        command = url.path.removeprefix("/control/")
        status, body = await _control(
            sim, command, parse_qs(url.query, keep_blank_values=True))
    else:
        status, body = 404, {"error": f"no such path {url.path}"}
    response = connection.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response

async def _control(sim: Simulator, command: str, query: dict[str, list[str]]) -> tuple[int, Any]:
    handler = _commands(sim).get(command)
    if handler is None:
        return 404, {"error": f"unknown command {command!r}"}
    try:
        return 200, await handler(Params(query))
    except ControlError as exc:
        return 400, {"error": str(exc)}

def _commands(sim: Simulator) -> dict[str, Callable[[Params], Coroutine[Any, Any, Any]]]:
    async def state(p: Params) -> Any:
        return sim.state()

    async def scan(p: Params) -> Any:
        return {"scanned": await sim.scan(p.text("login"))}

    async def enter_code(p: Params) -> Any:
        login = await sim.enter_code(p.text("code"))
        return {"paired": login is not None, "login": login}

    async def logout(p: Params) -> Any:
        await sim.logout(p.text("login"))
        return {"ok": True}

    async def ban(p: Params) -> Any:
        await sim.ban(p.text("login"))
        return {"ok": True}

    async def unban(p: Params) -> Any:
        await sim.unban(p.text("login"))
        return {"ok": True}

    async def drop(p: Params) -> Any:
        login = p.text("login")
        return {"dropped": await sim.drop(login, p.integer("code", 428))}

    async def unavailable(p: Params) -> Any:
        sim.set_unavailable(
            p.integer("code", 503), p.integer("count", 1), p.optional_integer("retry_after_ms")
        )
        return {"ok": True}

    async def faults(p: Params) -> Any:
        sim.set_faults(
            drop_min_s=p.optional_number("drop_min_s"),
            drop_max_s=p.optional_number("drop_max_s"),
            latency_ms=p.optional_number("latency_ms") or 0.0,
            lose_acks=p.optional_number("lose_acks") or 0.0,
            drop_media=p.integer("drop_media", 0),
        )
        return {"ok": True, "faults": asdict(sim.faults)}

    async def inbound(p: Params) -> Any:
        login, sender, body = p.text("login"), p.text("from"), p.text("body", allow_empty=True)
        return {"id": await sim.inbound(login, sender, body, p.content())}

    async def refuse(p: Params) -> Any:
        sim.refuse_next(p.text("login"), p.integer("code", 463),
                        p.text("reason", allow_empty=True) or "refused")
        return {"ok": True}

    async def receipt(p: Params) -> Any:
        status = p.text("status")
        if status not in ("delivered", "read", "played"):
            raise ControlError("status must be delivered, read or played")
        return {"sent": await sim.receipt(p.text("login"), p.text("id"), status)}

    async def record(p: Params) -> Any:
        return sim.record(p.text("login")).to_json()

    async def media(p: Params) -> Any:
        data = sim.media(p.text("login"), p.text("id"))
        if data is None:
            raise ControlError("no medium was accepted with that login and message id")
        return {"bytes": len(data), "data": base64.b64encode(data).decode()}

    async def reset(p: Params) -> Any:
        sim.reset()
        return {"ok": True}

    return {
        "state": state, "scan": scan, "enter-code": enter_code, "logout": logout,
        "ban": ban, "unban": unban, "drop": drop, "unavailable": unavailable,
        "faults": faults, "inbound": inbound, "record": record, "media": media,
        "reset": reset, "refuse": refuse, "receipt": receipt,
    }


class Params:
    """Query parameters of one control command, parsed strictly (ControlError = 400)."""

    def __init__(self, query: dict[str, list[str]]) -> None:
        self._query = query

    def _raw(self, name: str) -> str | None:
        values = self._query.get(name)
        return values[-1] if values else None

    def text(self, name: str, *, allow_empty: bool = False) -> str:
        value = self._raw(name)
        if value is None or (not value and not allow_empty):
            raise ControlError(f"missing parameter {name!r}")
        return value

    def optional_integer(self, name: str) -> int | None:
        value = self._raw(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ControlError(f"parameter {name!r} must be an integer") from None

    def integer(self, name: str, default: int) -> int:
        value = self.optional_integer(name)
        return default if value is None else value

    def content(self) -> Content | None:
        """`content`: docs/protocol.md "Content" as JSON (a medium's `data` base64); or
        its medium's bytes made up: `media_bytes` pseudo-random bytes from `media_seed`
        (`generated_media`), for media too large for a URL."""
        raw = self._raw("content")
        if raw is None:
            return None
        try:
            obj = json.loads(raw)
        except ValueError:
            raise ControlError("parameter 'content' must be JSON") from None
        size = self.optional_integer("media_bytes")
        if size is not None:
            if not (isinstance(obj, dict) and isinstance(obj.get("media"), dict)):
                raise ControlError("'media_bytes' needs a 'media' content")
            if not 1 <= size <= MAX_WIRE_MEDIA_BYTES:
                raise ControlError(f"'media_bytes' must be 1-{MAX_WIRE_MEDIA_BYTES}")
            data = generated_media(self.integer("media_seed", 0), size)
            obj["media"]["data"] = base64.b64encode(data).decode()
        try:
            return from_wire(obj, MAX_WIRE_MEDIA_BYTES)
        except ValueError as exc:
            raise ControlError(f"bad 'content': {exc}") from None

    def optional_number(self, name: str) -> float | None:
        value = self._raw(name)
        if value is None or value == "":
            return None
        try:
            number = float(value)
        except ValueError:
            raise ControlError(f"parameter {name!r} must be a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ControlError(f"parameter {name!r} must be finite")
        return number
