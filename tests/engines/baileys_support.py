"""Shared pieces of the Baileys engine's tests: is the bridge installed, and the
scripted fake WhatsApp's control API (engines/baileys/test/fake-socket.js)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import urllib.request
from typing import Any

import pytest

from broker.engines.baileys.supervisor import ENGINE_DIR

FAKE_ENV = "BROKER_BRIDGE_FAKE_SOCKET"
"""Test only: the bridge runs the scripted fake socket, its control API on this host:port."""


def bridge_installed() -> bool:
    return shutil.which("node") is not None and (ENGINE_DIR / "node_modules" / "baileys").is_dir()


needs_bridge = pytest.mark.skipif(
    not bridge_installed(),
    reason="needs node >= 20 and `npm ci` in engines/baileys (scripts/test.sh runs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FakeWhatsApp:
    """The control API of the fake socket inside one bridge process."""

    def __init__(self, port: int) -> None:
        self.address = f"127.0.0.1:{port}"

    async def do(self, action: str, **fields: Any) -> dict[str, Any]:
        """In a thread: the fake may need this loop (kv writes) before it answers."""
        return await asyncio.to_thread(self._do, action, fields)

    def _do(self, action: str, fields: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps({"action": action, **fields}).encode()
        request = urllib.request.Request(f"http://{self.address}/", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5) as answer:  # loopback only
            result: dict[str, Any] = json.loads(answer.read())
        return result

    async def record(self) -> dict[str, Any]:
        return await self.do("record")
