"""Synchronous client for the simulator's HTTP control endpoint.

Scripts, the CLI and tests running in another thread drive the simulator with
plain GETs; stdlib urllib keeps it dependency-free.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:50052"


class SimulatorControlError(RuntimeError):
    """The simulator refused a command (status set) or could not be reached (status None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SimulatorControl:
    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def command(self, name: str, **params: str | int | float | None) -> Any:
        """GET /control/<name>; parameters set to None are left out."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.base_url}/control/{name}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SimulatorControlError(_error_message(exc), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            message = f"cannot reach the simulator at {self.base_url}: {exc}"
            raise SimulatorControlError(message) from exc

    def state(self) -> Any:
        return self.command("state")

    def scan(self, login: str) -> Any:
        return self.command("scan", login=login)

    def enter_code(self, code: str) -> Any:
        """Type a pairing code (from RequestPairingCode) into the simulated phone."""
        return self.command("enter-code", code=code)

    def logout(self, login: str) -> Any:
        return self.command("logout", login=login)

    def ban(self, login: str) -> Any:
        return self.command("ban", login=login)

    def unban(self, login: str) -> Any:
        return self.command("unban", login=login)

    def drop(self, login: str, code: int = 428) -> Any:
        return self.command("drop", login=login, code=code)

    def unavailable(
        self, code: int = 503, count: int = 1, retry_after_ms: int | None = None
    ) -> Any:
        return self.command("unavailable", code=code, count=count, retry_after_ms=retry_after_ms)

    def faults(
        self,
        *,
        drop_min_s: float | None = None,
        drop_max_s: float | None = None,
        latency_ms: float | None = None,
        lose_acks: float | None = None,
        drop_media: int | None = None,
    ) -> Any:
        return self.command(
            "faults", drop_min_s=drop_min_s, drop_max_s=drop_max_s, latency_ms=latency_ms,
            lose_acks=lose_acks, drop_media=drop_media,
        )

    def inbound(
        self, login: str, sender: str, body: str, *, content: dict[str, Any] | None = None,
        media_bytes: int | None = None, media_seed: int = 0,
    ) -> Any:
        """Queue an inbound message; `content` as docs/protocol.md "Content" (a medium's
        `data` base64), or with `media_bytes` made-up bytes (`generated_media`)."""
        return self.command(
            "inbound", login=login, body=body, **{"from": sender},
            content=None if content is None else json.dumps(content),
            media_bytes=media_bytes, media_seed=media_seed if media_bytes else None)

    def record(self, login: str) -> Any:
        return self.command("record", login=login)

    def refuse(self, login: str, code: int = 463, reason: str = "refused") -> Any:
        """Refuse the login's next new message with `code`."""
        return self.command("refuse", login=login, code=str(code), reason=reason)

    def receipt(self, login: str, message_id: str, status: str) -> Any:
        """Send a "delivered", "read" or "played" receipt for an accepted message."""
        return self.command("receipt", login=login, id=message_id, status=status)

    def media(self, login: str, message_id: str) -> bytes:
        """The medium the simulator accepted with a message."""
        return base64.b64decode(self.command("media", login=login, id=message_id)["data"])

    def reset(self) -> Any:
        return self.command("reset")


def _error_message(exc: urllib.error.HTTPError) -> str:
    raw = exc.read()
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace") or f"HTTP {exc.code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return error
    return f"HTTP {exc.code}"
