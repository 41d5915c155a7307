"""Broker processes behind fault proxies, sequential senders, and the checks that
every fault test makes at the upstream (the simulator's records).

One sender per session sends `<sid>-<n>` under idempotency key `<sid>-<n>`,
one message at a time, through every instance in turn, retrying the same key
until it is told the message was acked. So the upstream must have accepted
exactly the told bodies, once each and in order; only the last Send of a
session, cut off by the end of the run, may be in doubt.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from broker.simulator import Simulator
from broker.simulator.record import Overlap
from broker_client import BrokerClient, BrokerError
from broker_client.v1 import broker_pb2 as pb
from tests.cluster.procs import BrokerProcess, ProcessFactory
from tests.cluster.test_scale_out import pair_all
from tests.faults.proxy import FaultProxy
from tests.helpers import eventually_async
from tests.redis_server import RedisServer

BROKER_CLIENT = "broker/"


@dataclass
class Instance:
    name: str
    proxy: FaultProxy
    proc: BrokerProcess


@dataclass
class SenderLog:
    told: list[str] = field(default_factory=list)
    """Bodies the broker said were acked, in the order they were sent."""
    in_doubt: str | None = None
    """A body whose Send had not been answered when the run ended."""
    errors: int = 0


class Fleet:
    """N broker instances on one Redis, each through its own FaultProxy."""

    def __init__(self, sim: Simulator, redis_server: RedisServer, factory: ProcessFactory,
                 *, ttl: float) -> None:
        self.sim = sim
        self.redis_server = redis_server
        self.factory = factory
        self.ttl = ttl
        self.instances: dict[str, Instance] = {}
        self.redis = aioredis.Redis.from_url(redis_server.url)
        self.logs: dict[str, SenderLog] = {}
        self._stop = asyncio.Event()
        self._senders: list[asyncio.Task[None]] = []
        self._clients: dict[str, BrokerClient] = {}

    def _client(self, address: str) -> BrokerClient:
        """One channel per instance address for all senders (a restarted instance
        listens on a new port, so it gets a new one)."""
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = BrokerClient(address, timeout=10, retry_attempts=3)
        return client

    async def start(self, names: list[str], *extra: str) -> None:
        for name in names:
            await self.launch(name, *extra)

    async def launch(self, name: str, *extra: str) -> Instance:
        old = self.instances.get(name)
        proxy = old.proxy if old else await FaultProxy("127.0.0.1", self.redis_server.port).start()
        proc = await asyncio.to_thread(
            self.factory, name, proxy.url, self.sim.url, "--lease-ttl", str(self.ttl), *extra)
        self.instances[name] = Instance(name, proxy, proc)
        return self.instances[name]

    def address(self, n: int) -> str:
        live = [i for i in self.instances.values() if i.proc.alive]
        return live[n % len(live)].proc.address

    async def create_and_pair(self, session_ids: list[str], timeout: float = 180) -> None:
        """Create and pair every session, until all are OPEN.

        Sessions move between instances while they pair (the fleet balances
        itself), so a scanned QR can belong to a pairing connection that was
        just handed over: keep scanning whatever still shows a QR, and restart
        a session whose pairing gave up, until every one is OPEN.
        """
        async with BrokerClient(self.address(0)) as admin:
            for sid in session_ids:
                await admin.create_session(sid)
            await pair_all(self.sim, session_ids, timeout)

            async def paired() -> bool:
                try:
                    states = await self.states()
                except BrokerError:
                    return False
                for sid in session_ids:
                    if states.get(sid) == pb.PAIRING:
                        await self.sim.scan(sid)
                    elif states.get(sid) in (pb.FAILED, pb.LOGGED_OUT):
                        with contextlib.suppress(BrokerError):
                            await admin.restart_session(sid)
                return all(states.get(sid) == pb.OPEN for sid in session_ids)

            await eventually_async(paired, timeout, "every session paired and OPEN")

    async def states(self) -> dict[str, int]:
        async with BrokerClient(self.address(0), timeout=60) as admin:
            return {s.session_id: s.state for s in await admin.list_sessions()}

    async def wait_all_open(self, session_ids: list[str], timeout: float = 60) -> None:
        async def all_open() -> bool:
            with contextlib.suppress(BrokerError):
                states = await self.states()
                return all(states.get(sid) == pb.OPEN for sid in session_ids)
            return False

        try:
            await eventually_async(all_open, timeout, "every session OPEN")
        except AssertionError as exc:
            try:
                states = await self.states()
            except BrokerError as err:
                states = {"error": str(err)}  # type: ignore[dict-item]
            not_open = {sid: states.get(sid) for sid in session_ids if states.get(sid) != pb.OPEN}
            raise AssertionError(f"{exc}; not open: {not_open}; {states.get('error', '')}"
                                 ) from None

    # senders
    def start_senders(self, session_ids: list[str], *, max_messages: int = 10_000) -> None:
        self._stop.clear()
        for sid in session_ids:
            self.logs.setdefault(sid, SenderLog())
            self._senders.append(asyncio.create_task(self._send_loop(sid, max_messages)))

    async def stop_senders(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._senders)
        self._senders.clear()

    async def _send_loop(self, sid: str, max_messages: int) -> None:
        log = self.logs[sid]
        n = len(log.told)
        attempt = 0
        while not self._stop.is_set() and n < max_messages:
            body = f"{sid}-{n}"
            log.in_doubt = body
            try:
                client = self._client(self.address(n + attempt))
                await client.send(sid, "+15550100", body, idempotency_key=body)
            except (BrokerError, OSError):
                log.errors += 1
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.2)
                continue
            log.told.append(body)
            log.in_doubt = None
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.02)

    # the checks, at the upstream
    def delivery_problems(self, session_ids: list[str]) -> list[str]:
        """What differs between what workers were told and what the upstream accepted."""
        problems = []
        for sid in session_ids:
            log = self.logs.get(sid, SenderLog())
            bodies = [m.body for m in self.sim.record(sid).accepted]
            if len(bodies) != len(set(bodies)):
                problems.append(f"{sid}: a body reached the upstream under two message ids")
            if log.in_doubt is not None and bodies[-1:] == [log.in_doubt]:
                bodies = bodies[:-1]  # accepted after all, just before the end: no loss
            if bodies != log.told:
                first = next((i for i, (a, b) in enumerate(zip(bodies, log.told, strict=False))
                              if a != b), min(len(bodies), len(log.told)))
                problems.append(f"{sid}: told {len(log.told)}, upstream has {len(bodies)}; "
                                f"first difference at {first}")
        return problems

    def broker_overlaps(self, session_ids: list[str]) -> list[Overlap]:
        """Times one broker connection met another live one of the same login."""
        return [o for sid in session_ids for o in self.sim.record(sid).overlaps_by(BROKER_CLIENT)]

    def conflicts(self, session_ids: list[str]) -> int:
        return sum(self.sim.record(sid).conflicts for sid in session_ids)

    async def wait_delivered(self, session_ids: list[str], timeout: float = 60) -> None:
        """Until the upstream has every told body (delivery may trail the last ack)."""
        async def delivered() -> bool:
            return not self.delivery_problems(session_ids)

        with contextlib.suppress(AssertionError):
            await eventually_async(delivered, timeout, "every told message delivered")

    async def close(self) -> None:
        self._stop.set()
        for task in self._senders:
            task.cancel()
        for client in self._clients.values():
            await client.close()
        for instance in self.instances.values():
            await instance.proxy.close()
        await self.redis.aclose()
