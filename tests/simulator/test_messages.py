"""Acks, receipts, de-duplication, lost acks, latency and inbound messages."""

from __future__ import annotations

from broker.simulator import AcceptedMessage, Simulator, SimulatorConfig
from broker.upstream.protocol import Ack, InboundAck, Message, Ping, Pong, Receipt, Send, encode

from .helpers import next_frame, open_session, reconnect, say_hello, until_closed


def send(message_id: str, body: str = "hi") -> str:
    return encode(Send(id=message_id, to="15550001111", body=body))


async def test_send_is_acked_then_receipted(sim: Simulator) -> None:
    ws, ready = await open_session(sim, "alice")
    await ws.send(send("m-1"))
    assert await next_frame(ws) == Ack(id="m-1", duplicate=False)
    assert await next_frame(ws) == Receipt(id="m-1", status="delivered")
    assert sim.record("alice").accepted == [
        AcceptedMessage("m-1", "15550001111", "hi", ready.connection_id)
    ]
    await ws.close()


async def test_duplicates_are_acked_but_recorded_once_in_order() -> None:
    async with Simulator(SimulatorConfig(receipt_delay_s=0)) as sim:
        ws, _ = await open_session(sim, "bob")
        for message_id in ["m-1", "m-2", "m-1", "m-3", "m-2"]:
            await ws.send(send(message_id))
        acks = [await next_frame(ws) for _ in range(5)]
        assert [(a.id, a.duplicate) for a in acks if isinstance(a, Ack)] == [
            ("m-1", False), ("m-2", False), ("m-1", True), ("m-3", False), ("m-2", True),
        ]
        record = sim.record("bob")
        assert record.accepted_ids() == ["m-1", "m-2", "m-3"]
        assert record.duplicates == 2
        await ws.close()


async def test_duplicates_are_detected_across_connections(sim: Simulator) -> None:
    creds = sim.issue_credentials("bob")
    ws = await reconnect(sim, "bob", creds)
    await ws.send(send("m-1"))
    assert await next_frame(ws) == Ack(id="m-1", duplicate=False)
    await ws.close()
    ws = await reconnect(sim, "bob", creds)
    await ws.send(send("m-1"))
    assert await next_frame(ws) == Ack(id="m-1", duplicate=True)
    assert sim.record("bob").accepted_ids() == ["m-1"]
    await ws.close()


async def test_lost_acks_still_record_the_message(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "carol")
    sim.set_faults(lose_acks=1.0)
    await ws.send(send("m-1"))
    await ws.send(encode(Ping(id=1)))
    # The pong is the next thing the client hears: no ack, no receipt.
    assert await next_frame(ws) == Pong(id=1)
    assert sim.record("carol").accepted_ids() == ["m-1"]
    await ws.close()


async def test_latency_keeps_answers_in_order(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "carol")
    sim.set_faults(latency_ms=20)
    await ws.send(send("m-1"))
    await ws.send(encode(Ping(id=9)))
    assert await next_frame(ws) == Ack(id="m-1")
    assert await next_frame(ws) == Pong(id=9)
    await ws.close()


async def test_send_before_ready_is_a_bad_frame(sim: Simulator) -> None:
    ws = await say_hello(sim, "dave", None)  # pairing, not ready
    await ws.send(send("m-1"))
    assert (await until_closed(ws)).code == 4400
    assert sim.record("dave").accepted == []


async def test_inbound_delivered_to_a_live_connection(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "erin")
    message_id = await sim.inbound("erin", "15559990000", "hello there")
    frame = await next_frame(ws)
    assert isinstance(frame, Message)
    assert (frame.id, frame.sender, frame.body) == (message_id, "15559990000", "hello there")
    await ws.send(encode(InboundAck(id=message_id)))
    await sim.wait_for(lambda: sim.record("erin").inbound_acked == [message_id], timeout=3)
    await ws.close()


async def test_inbound_queued_until_connected_and_redelivered_until_acked(
    sim: Simulator,
) -> None:
    creds = sim.issue_credentials("erin")
    first = await sim.inbound("erin", "1555", "one")
    second = await sim.inbound("erin", "1555", "two")

    ws = await reconnect(sim, "erin", creds)
    frames = [await next_frame(ws), await next_frame(ws)]
    assert [f.id for f in frames if isinstance(f, Message)] == [first, second]
    await ws.send(encode(InboundAck(id=first)))
    await sim.wait_for(lambda: sim.record("erin").inbound_acked == [first], timeout=3)
    await ws.close()

    ws = await reconnect(sim, "erin", creds)
    again = await next_frame(ws)
    assert isinstance(again, Message) and again.id == second
    await ws.close()


async def test_frames_keep_flowing_while_a_receipt_is_pending() -> None:
    async with Simulator(SimulatorConfig(receipt_delay_s=5.0)) as sim:
        ws, _ = await open_session(sim, "fay")
        await ws.send(send("m-1"))
        await ws.send(encode(Ping(id=2)))
        assert await next_frame(ws) == Ack(id="m-1")
        assert await next_frame(ws) == Pong(id=2)
        await ws.close()
