"""The Baileys engine in real `broker serve --engine baileys` processes on one Redis,
each with its own bridge running the scripted fake WhatsApp: the worker-facing
paths (Send, Receive, pairing code, reasons) and the owner dying."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker_client import BrokerClient, Message, MessageRefused
from broker_client.v1 import broker_pb2 as pb
from tests.cluster.procs import BrokerProcess
from tests.cluster.test_scale_out import all_open, lease_owners
from tests.engines.baileys_support import FAKE_ENV, FakeWhatsApp, free_port, needs_bridge
from tests.helpers import eventually_async
from tests.redis_server import RedisServer

pytestmark = needs_bridge


class Instance:
    def __init__(self, proc: BrokerProcess, fake: FakeWhatsApp) -> None:
        self.proc = proc
        self.fake = fake


StartInstance = Callable[..., Instance]


@pytest.fixture
def start_instance(tmp_path: Path, credential_env: dict[str, str]) -> Iterator[StartInstance]:
    made: list[BrokerProcess] = []

    def start(name: str, store_url: str, *extra: str) -> Instance:
        port = free_port()
        proc = BrokerProcess(name, store_url, "-", tmp_path,
                             credential_env | {FAKE_ENV: f"127.0.0.1:{port}"}, extra)
        at = proc.args.index("--upstream-url")
        proc.args[at:at + 2] = ["--engine", "baileys", "--rate-limit", "0"]
        proc.start()
        made.append(proc)
        return Instance(proc, FakeWhatsApp(port))

    yield start
    for proc in made:
        proc.close()


async def wait_state(client: BrokerClient, sid: str, state: pb.SessionState.ValueType,
                     timeout: float = 30) -> None:
    async def there() -> bool:
        return (await client.get_session(sid)).state == state
    await eventually_async(there, timeout, f"{sid} in state {pb.SessionState.Name(state)}")


async def pair(inst: Instance, client: BrokerClient, sid: str) -> None:
    await client.create_session(sid)
    await wait_state(client, sid, pb.PAIRING)
    assert (await inst.fake.do("scan", session=sid, phone="15550001"))["ok"]
    await wait_state(client, sid, pb.OPEN)


async def test_serve_pairs_by_code_sends_receives_and_reports_405(
    redis_server: RedisServer, start_instance: StartInstance
) -> None:
    metrics_port = free_port()
    inst = start_instance("b0", redis_server.url, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    scrape = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
    assert "broker_bridge_up 1.0" in scrape and "broker_bridge_starts_total 1.0" in scrape
    async with BrokerClient(inst.proc.address) as client:
        # Pairing by phone number.
        await client.create_session("c1")
        await wait_state(client, "c1", pb.PAIRING)
        code = await client.request_pairing_code("c1", "+15550002")
        assert len(code) == 8
        assert (await inst.fake.do("enter_code", session="c1", code=code))["ok"]
        await wait_state(client, "c1", pb.OPEN)
        # Send: acked, with the broker's message id as WhatsApp's.
        result = await client.send("c1", "+15550009", "hi there")
        assert result.acked
        sent = (await inst.fake.record())["sent"]
        assert [(s["id"], s["text"]) for s in sent] == [(result.message_id, "hi there")]
        # Inbound: a worker's Receive gets it.
        got: list[pb.InboundMessage] = []

        async def worker() -> None:
            async for message in client.receive(["c1"], group="w"):
                got.append(message)
                await client.ack_inbound("c1", [message.inbound_id], group="w")

        task = asyncio.create_task(worker())
        try:
            sender = {"from": "15550003@s.whatsapp.net"}
            await inst.fake.do("inbound", session="c1", id="WA2", text="hello broker", **sender)

            async def received() -> bool:
                return any(m.upstream_id == "WA2" for m in got)
            await eventually_async(received, 20, "the inbound message at the worker")
        finally:
            task.cancel()
        message = next(m for m in got if m.upstream_id == "WA2")
        assert (message.sender, message.body) == ("15550003@s.whatsapp.net", "hello broker")
        # 405: WhatsApp rejects the web version: its own reason, not a generic close.
        assert (await inst.fake.do("fail_connect", session="c1", code=405,
                                   message="Connection Failure"))["ok"]
        assert (await inst.fake.do("close", session="c1", code=428, message="lost"))["ok"]

        async def outdated() -> bool:
            s = await client.get_session("c1")
            return s.code == 405
        await eventually_async(outdated, 20, "the 405 reason")
        session = await client.get_session("c1")
        assert "outdated" in session.reason


async def test_owner_killed_another_instance_owns_with_the_same_keys_no_pairing(
    redis_server: RedisServer, start_instance: StartInstance
) -> None:
    insts = [start_instance(f"b{i}", redis_server.url, "--lease-ttl", "2")
             for i in range(2)]
    r = aioredis.Redis.from_url(redis_server.url)
    sids = [f"f{i:02d}" for i in range(8)]
    async with BrokerClient(insts[0].proc.address) as client:
        for sid in sids:
            await client.create_session(sid)

        pending = set(sids)

        async def scanned() -> bool:
            for sid in list(pending):
                for inst in insts:
                    if (await inst.fake.do("scan", session=sid))["ok"]:
                        pending.discard(sid)
                        break
            return not pending

        await eventually_async(scanned, 30, "every session to show a QR")
        await eventually_async(lambda: all_open(client, sids), 30, "every session OPEN")

        async def both_own() -> bool:
            return len(set((await lease_owners(r, sids)).values()) - {None}) == 2
        await eventually_async(both_own, 30, "both instances owning sessions")

        async def settled() -> bool:  # each session open on its lease owner's bridge
            owners = await lease_owners(r, sids)
            live = {f"b{i}": set((await inst.fake.record())["open"])
                    for i, inst in enumerate(insts)}
            return all(sid in live.get(owner or "", set()) for sid, owner in owners.items())
        await eventually_async(settled, 30, "every session open on its owner")

    owners = await lease_owners(r, sids)
    victim, survivor = insts[0], insts[1]
    moved = [sid for sid in sids if owners[sid] == "b0"]
    assert moved
    before = {sid: set(prints) for sid, prints in
              (await victim.fake.record())["fingerprints"].items()}
    assert victim.proc.proc is not None
    pid = victim.proc.proc.pid
    children = await asyncio.to_thread(Path(f"/proc/{pid}/task/{pid}/children").read_text)
    bridge_pids = [int(p) for p in children.split()]
    assert bridge_pids
    victim.proc.signal(signal.SIGKILL)
    victim.proc.wait()

    async with BrokerClient(survivor.proc.address) as client:
        async def moved_open() -> bool:
            return set(moved) <= set((await survivor.fake.record())["open"])
        await eventually_async(moved_open, 40, "the moved sessions open on the survivor")
        await eventually_async(lambda: all_open(client, sids), 40, "every session OPEN again")
        after = (await survivor.fake.record())
        for sid in moved:
            # The new owner's bridge opened with the stored creds: same noise key, no QR.
            assert set(after["fingerprints"][sid]) == before[sid], sid
            assert len(before[sid]) == 1, sid
            assert sid not in after["pairing_codes"]
            result = await client.send(sid, "15550009", f"after failover {sid}")
            assert result.acked
    # The dead instance's bridge saw its stdin close and exited: no orphan holds sockets.
    for pid in bridge_pids:
        await eventually_async(functools.partial(_gone, pid), 10, f"bridge {pid} to exit")
    await r.aclose()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:  # loopback only
        text: str = answer.read().decode()
        return text


async def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_refusals_fail_sends_typed_inbound_has_origin_health_shows_the_bridge(
    redis_server: RedisServer, start_instance: StartInstance
) -> None:
    inst = start_instance("r0", redis_server.url)
    sids = [f"r{i}" for i in range(4)]
    refused_sids, fine_sids = sids[::2], sids[1::2]
    async with BrokerClient(inst.proc.address) as client:
        for sid in sids:
            await pair(inst, client, sid)
        report = await client.health_report()
        assert (report.engine.name, report.engine.up, report.engine.starts) == ("baileys", True, 1)
        assert "bridge up" in report.engine.detail

        # WhatsApp answers the next send of half the sessions with an error ack (463).
        for sid in refused_sids:
            assert (await inst.fake.do("fail_send", session=sid, code=463))["ok"]
        outcomes = await asyncio.gather(
            *(client.send(sid, "15550009", f"first {sid}", idempotency_key=f"k-{sid}")
              for sid in sids), return_exceptions=True)
        by_sid = dict(zip(sids, outcomes, strict=True))
        for sid in refused_sids:
            error = by_sid[sid]
            assert isinstance(error, MessageRefused), (sid, error)
            assert error.reason == "MESSAGE_REFUSED" and error.metadata["code"] == "463"
            assert error.metadata["session_id"] == sid and error.metadata["message_id"]
        for sid in fine_sids:
            result = by_sid[sid]
            assert not isinstance(result, BaseException) and result.acked, (sid, result)

        # Final: a retry under the key answers the same refusal and sends nothing again.
        with pytest.raises(MessageRefused) as again:
            await client.send(refused_sids[0], "15550009", f"first {refused_sids[0]}",
                              idempotency_key=f"k-{refused_sids[0]}")
        first = by_sid[refused_sids[0]]
        assert isinstance(first, MessageRefused)
        assert again.value.metadata["message_id"] == first.metadata["message_id"]
        # The session is not stuck: its next message goes out; a batch carries the
        # refusal per item.
        assert (await inst.fake.do("fail_send", session=refused_sids[1], code=475))["ok"]
        batch = await client.send_many([Message(sid, "15550009", f"second {sid}")
                                        for sid in refused_sids])
        assert not isinstance(batch[0], BaseException) and batch[0].acked
        assert isinstance(batch[1], MessageRefused) and batch[1].metadata["code"] == "475"
        sent = [(s["session"], s["text"]) for s in (await inst.fake.record())["sent"]]
        for sid in sids:  # each message reached sendMessage once
            assert sent.count((sid, f"first {sid}")) == 1, sid
        health = {h.session.session_id: h for h in await client.health(sids)}
        for sid, refusals in zip(refused_sids, (1, 2), strict=True):
            assert health[sid].counters.messages_refused == refusals, sid
            assert "MESSAGES_REFUSED" in [r.code for r in health[sid].recommendations]
        for sid in fine_sids:
            assert health[sid].counters.messages_refused == 0, sid

        # Inbound from a group, with the sender's LID, push name and the chat.
        got: list[pb.InboundMessage] = []

        async def worker() -> None:
            async for message in client.receive(fine_sids, group="w"):
                got.append(message)
                await client.ack_inbound(message.session_id, [message.inbound_id], group="w")

        task = asyncio.create_task(worker())
        try:
            for n, sid in enumerate(fine_sids):
                assert (await inst.fake.do(
                    "inbound", session=sid, id=f"G{n}", text=f"hi {sid}",
                    **{"from": "15550003@s.whatsapp.net", "lid": f"9990{n}@lid",
                       "push_name": f"Ana {n}", "chat": "120363000000@g.us"}))["ok"]

            async def received() -> bool:
                return len({m.upstream_id for m in got}) == len(fine_sids)
            await eventually_async(received, 20, "the group messages at the worker")
        finally:
            task.cancel()
        for n, sid in enumerate(fine_sids):
            message = next(m for m in got if m.upstream_id == f"G{n}")
            assert (message.session_id, message.body) == (sid, f"hi {sid}")
            assert (message.sender, message.sender_lid, message.push_name, message.chat) == (
                "15550003@s.whatsapp.net", f"9990{n}@lid", f"Ana {n}", "120363000000@g.us")
            assert message.sent_at.seconds > 0

        # The bridge SIGKILLed: Health's engine shows the restart, sessions open again.
        assert inst.proc.proc is not None
        pid = inst.proc.proc.pid
        children = await asyncio.to_thread(Path(f"/proc/{pid}/task/{pid}/children").read_text)
        [bridge] = [int(p) for p in children.split()]
        os.kill(bridge, signal.SIGKILL)

        async def restarted() -> bool:
            engine = (await client.health_report()).engine
            return engine.up and engine.starts == 2
        await eventually_async(restarted, 30, "Health to show the restarted bridge")
        engine = (await client.health_report()).engine
        assert "restarted after it exited with -9" in engine.detail
        await eventually_async(lambda: all_open(client, sids), 40, "every session OPEN again")
