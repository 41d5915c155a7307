"""Shared pieces of the benchmark harness: processes, /proc readings, statistics,
pairing a session through the simulator. Benchmarks print numbers; nothing here
asserts anything."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
_LISTENING = re.compile(r"broker listening on (\S+)")
_READY = re.compile(r"^READY (\{.*\})$", re.M)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def stat_cpu_seconds(stat: Path) -> float:
    """utime + stime of a /proc/<pid>/stat (or /proc/<pid>/task/<tid>/stat) file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def raise_nofile() -> None:
    """Lift the soft open-file limit to the hard limit (10k sockets need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- statistics ----------------------------------------------------------------

def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values_s),
        "p50_ms": round(pct(values_s, 50) * 1000, 3),
        "p99_ms": round(pct(values_s, 99) * 1000, 3),
        "max_ms": round(max(values_s) * 1000, 3) if values_s else float("nan"),
    }


# -- processes -----------------------------------------------------------------

class Proc:
    """A child process of the harness; output goes to a log file in the run dir."""

    def __init__(self, name: str, args: list[str], workdir: Path,
                 env: dict[str, str] | None = None, stdin: bool = False) -> None:
        self.name = name
        self.args = args
        self.log_path = workdir / f"{name}.log"
        self.out_path = workdir / f"{name}.out"
        full_env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
        # Children inherit the limit. Raised here, not in a preexec_fn: with one,
        # Popen must fork() rather than vfork(), fork runs grpc's fork handlers,
        # and those restart a poller whose epoll fd close_fds has just closed:
        # the child dies of EBADF before exec (grpc/grpc#43157).
        raise_nofile()
        with self.log_path.open("ab") as log, self.out_path.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=log, cwd=ROOT, env=full_env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.out_path.read_text(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_pattern(self, pattern: re.Pattern[str], timeout: float, *,
                     stream: str = "out") -> re.Match[str]:
        deadline = time.monotonic() + timeout
        path = self.out_path if stream == "out" else self.log_path
        while time.monotonic() < deadline:
            found = pattern.search(path.read_text(errors="replace"))
            if found:
                return found
            if not self.alive:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} not ready within {timeout}s:\n{self.log()}")

    def ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Roles print one line `READY {json}` once they serve."""
        found = self.wait_pattern(_READY, timeout)
        result: dict[str, Any] = json.loads(found.group(1))
        return result

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        """The last `RESULT {json}` line, after the process exits (killed at the timeout)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"{self.name} did not finish within {timeout}s:\n{self.log()}") from None
        for line in reversed(self.text().splitlines()):
            if line.startswith("RESULT "):
                parsed: dict[str, Any] = json.loads(line[len("RESULT "):])
                return parsed
        raise RuntimeError(f"{self.name} printed no result (rc {self.proc.returncode}):\n"
                           f"{self.log()}")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.alive:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace."""
        if not self.alive:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(8)
        except subprocess.TimeoutExpired:
            self.kill()

    # /proc readings
    def cpu_seconds(self) -> float:
        return stat_cpu_seconds(Path(f"/proc/{self.pid}/stat"))

    def rss_bytes(self) -> int:
        pages = Path(f"/proc/{self.pid}/statm").read_text().split()[1]
        return int(pages) * PAGE


def role(name: str, module: str, args: list[str], workdir: Path, *,
         env: dict[str, str] | None = None, stdin: bool = False) -> Proc:
    """Run one of the harness's own roles (`python -m scripts.bench.<module> ...`)."""
    return Proc(name, [PY, "-m", f"scripts.bench.{module}", *args], workdir, env, stdin)


BENCH = ROOT / "scripts" / "bench"


def node_peer(name: str, workdir: Path, upstream_url: str, control_url: str) -> Proc:
    """The Express + ws relay peer (scripts/bench/node/http_relay.js), its packages
    installed from the harness's own lockfile on first use (`npm ci`)."""
    if not (BENCH / "node_modules" / "express").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=BENCH, check=True, timeout=300)
    return Proc(name, ["node", str(BENCH / "node" / "http_relay.js"), "--upstream-url",
                       upstream_url, "--control-url", control_url], workdir)


def broker(name: str, workdir: Path, upstream_url: str, *, store: str = "memory://",
           extra: Sequence[str] = (), env: dict[str, str] | None = None,
           timeout: float = 30.0) -> tuple[Proc, str]:
    """`broker serve` exactly as an operator runs it; returns it and its address."""
    args = [PY, "-m", "broker.cli", "serve", "--listen", "127.0.0.1:0", "--store", store,
            "--upstream-url", upstream_url, "--instance-id", name, *extra]
    data = {"BROKER_DATA_DIR": str(workdir / f"{name}-data")}  # never the user's folder
    proc = Proc(name, args, workdir, data | (env or {}))
    found = proc.wait_pattern(_LISTENING, timeout, stream="log")
    return proc, found.group(1)


def simulator(name: str, workdir: Path, *, idle_timeout: float = 20.0,
              qr_interval: float = 60.0) -> tuple[Proc, str, str]:
    """The upstream simulator in its own process; returns it, its ws URL, its control URL."""
    proc = role(name, "servers", ["sim", "--idle-timeout", str(idle_timeout),
                                  "--qr-interval", str(qr_interval)], workdir)
    info = proc.ready()
    return proc, str(info["url"]), str(info["control"])


# -- simulator HTTP control ----------------------------------------------------

def control(base: str, command: str, **params: Any) -> Any:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    url = f"{base}/control/{command}" + (f"?{query}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


async def acontrol(base: str, command: str, **params: Any) -> Any:
    return await asyncio.to_thread(control, base, command, **params)


async def pair_upstream(url: str, control_url: str, login: str) -> Any:
    """Pair `login` with the simulator directly (the QR scanned over HTTP); its credentials."""
    from websockets.asyncio.client import connect

    async with connect(url, ping_interval=None) as ws:  # the pairing connection
        await ws.send(json.dumps({"type": "hello", "login": login, "credentials": None}))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "qr":
                await http_scan(control_url, login)
            elif frame["type"] == "paired":
                return frame["credentials"]
    raise RuntimeError(f"{login}: the simulator closed the pairing connection")


async def upstream_login(url: str, control_url: str, login: str) -> Any:
    """A websocket logged in to the simulator as `login`, paired first (the QR scanned
    over HTTP), past its `ready`: what the floors use instead of the broker."""
    from websockets.asyncio.client import connect

    creds = await pair_upstream(url, control_url, login)
    ws = await connect(url, ping_interval=None, max_size=1 << 20)
    await ws.send(json.dumps({"type": "hello", "login": login, "credentials": creds}))
    while json.loads(await ws.recv())["type"] != "ready":
        pass
    return ws


# -- sessions through the broker's API -----------------------------------------

async def http_scan(control_url: str, login: str) -> None:
    await acontrol(control_url, "scan", login=login)


async def pair_sessions(address: str, control_url: str, session_ids: Sequence[str], *,
                        timeout: float = 60.0, concurrency: int = 32,
                        scan: Callable[[str, str], Awaitable[None]] = http_scan) -> None:
    """CreateSession each, scan its QR through the simulator, wait until all are OPEN."""
    import grpc

    from broker_client.v1 import broker_pb2 as pb
    from broker_client.v1 import broker_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        gate = asyncio.Semaphore(concurrency)

        async def create(sid: str) -> None:
            async with gate:
                await stub.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=30)

        await asyncio.gather(*(create(s) for s in session_ids))
        wanted = set(session_ids)
        scanned: dict[str, float] = {}
        while time.monotonic() < deadline:
            listed_at = time.monotonic()
            listing = await stub.ListSessions(pb.ListSessionsRequest(), timeout=60)
            pause = max(0.2, 2 * (time.monotonic() - listed_at))  # 10k sessions: not too often
            states = {s.session_id: s.state for s in listing.sessions if s.session_id in wanted}
            if all(states.get(s) == pb.OPEN for s in wanted):
                return
            now = time.monotonic()
            todo = [s for s in wanted if states.get(s) == pb.PAIRING
                    and now - scanned.get(s, 0.0) > 5.0]

            async def scan_one(sid: str) -> None:
                async with gate:
                    await scan(control_url, sid)
                    scanned[sid] = time.monotonic()

            await asyncio.gather(*(scan_one(s) for s in todo))
            await asyncio.sleep(pause)
        missing = sorted(s for s in wanted if states.get(s) != pb.OPEN)
        raise RuntimeError(f"{len(missing)} sessions not OPEN within {timeout}s: {missing[:5]}")


def credential_env() -> dict[str, str]:
    from broker.store.crypto import generate_key

    return {"BROKER_CREDENTIAL_KEYS": f"k1:{generate_key()}"}
