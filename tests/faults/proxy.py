"""A TCP proxy on loopback that can cut one client off from a server.

Sits between one broker instance and Redis (or the upstream), so a test can
partition exactly that instance while everybody else keeps talking:

- `blackhole()`: connections stay up, bytes in both directions vanish, new
  connections are accepted and then hear nothing (a dead route). `heal()`
  resets the connections that lost bytes, as TCP would after its timeout:
  their byte streams are no longer whole.
- `stall()`: bytes are held, in order, and delivered on `heal()` (a long
  pause of the network or of the peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum


class Mode(enum.Enum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    STALL = "stall"


class _Pipe:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.writers = (client, server)
        self.lost_bytes = False

    def close(self) -> None:
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._mode = Mode.PASS
        self._healed = asyncio.Event()
        self._healed.set()
        self.port = 0

    @property
    def url(self) -> str:
        """A redis:// URL through this proxy (for a Redis target)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def mode(self) -> Mode:
        return self._mode

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def blackhole(self) -> None:
        self._mode = Mode.BLACKHOLE
        self._healed.clear()

    def stall(self) -> None:
        self._mode = Mode.STALL
        self._healed.clear()

    def heal(self) -> None:
        for pipe in [p for p in self._pipes if p.lost_bytes]:
            pipe.close()
            self._pipes.discard(pipe)
        self._mode = Mode.PASS
        self._healed.set()

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            pipe.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        pipe = _Pipe(writer, up_writer)
        self._pipes.add(pipe)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(pipe, src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, pipe: _Pipe, src: asyncio.StreamReader,
                    dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(65536):
                if self._mode is Mode.STALL:
                    await self._healed.wait()
                if self._mode is Mode.BLACKHOLE:
                    pipe.lost_bytes = True
                    continue
                dst.write(chunk)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            pipe.close()
            self._pipes.discard(pipe)
