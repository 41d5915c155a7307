"""When a session's outbox writes linger: only while it is pipelined (several
messages awaiting acks), and for a moment after, never for one Send at a time."""

from __future__ import annotations

import asyncio

from broker.config import Settings
from broker.runtime.actor import PIPELINED, PIPELINED_HOLD_S, SessionActor
from broker.store.base import OutboxMessage, SessionRecord
from broker.store.memory import MemoryStore
from broker.upstream.websocket import WebsocketProvider


def _message(n: int) -> OutboxMessage:
    return OutboxMessage(session_id="s-1", message_id=f"m-{n}", to="+1", body="hi",
                         idempotency_key=f"k-{n}", sequence=n, accepted_at=0.0)


def _actor() -> SessionActor:
    # Never started: _pipelined reads only what is in flight and the loop's clock.
    return SessionActor(SessionRecord("s-1", "default"), store=MemoryStore(),
                        provider=WebsocketProvider("ws://127.0.0.1:9"),
                        settings=Settings())


def _in_flight(actor: SessionActor, n: int) -> None:
    actor._in_flight = {f"m-{i}": (_message(i), 0.0) for i in range(n)}


async def test_one_send_at_a_time_never_lingers() -> None:
    actor = _actor()
    for n in (0, 1, PIPELINED - 1):
        _in_flight(actor, n)
        assert not actor._pipelined()


async def test_a_pipelined_session_lingers_while_anything_is_in_flight_for_a_moment() -> None:
    actor = _actor()
    _in_flight(actor, PIPELINED)
    assert actor._pipelined()
    _in_flight(actor, 1)  # right after a batch of acks: still pipelined
    assert actor._pipelined()
    _in_flight(actor, 0)  # nothing in flight: nothing is coming, write at once
    assert not actor._pipelined()
    _in_flight(actor, 1)
    await asyncio.sleep(PIPELINED_HOLD_S * 1.5)  # the moment has passed
    assert not actor._pipelined()
