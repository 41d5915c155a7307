"""broker/runtime/sendflow.py: the order and backpressure rules of a many-Sends call,
with a stand-in for the manager's send whose acceptance takes varying time."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from broker.errors import BrokerError, SessionNotFound
from broker.runtime.sendflow import SendFlow, SendItem, send_all


class Outbox:
    """Takes a message after a random delay (as a store read would), then waits long
    for its 'ack': only the place in the outbox is ordered, not the answers."""

    def __init__(self, seed: int = 7) -> None:
        self.placed: dict[str, list[int]] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self._rng = random.Random(seed)

    async def send(self, item: SendItem, placed: Callable[[], None]) -> object:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self._rng.random() / 500)
            if item.session_id == "unknown":
                raise SessionNotFound(item.session_id)
            self.placed.setdefault(item.session_id, []).append(item.ref)
            placed()
            await asyncio.sleep(self._rng.random() / 200)
            return ("ok", item.ref)
        finally:
            self.in_flight -= 1


def _items(n: int, sessions: int = 3) -> list[SendItem]:
    return [SendItem(ref=i, session_id=f"s{i % sessions}", to="+1", body=str(i))
            for i in range(n)]


async def test_items_of_a_session_are_placed_in_submission_order() -> None:
    outbox = Outbox()
    flow = SendFlow(outbox.send)
    for it in _items(120):
        await flow.submit(it)
    flow.close()
    answered = [ref for batch in [b async for b in flow.results()] for ref, _ in batch]
    assert sorted(answered) == list(range(120))
    for s in range(3):
        assert outbox.placed[f"s{s}"] == list(range(s, 120, 3))
    assert outbox.most_in_flight > 3  # still concurrent: only the placing is ordered


async def test_a_refused_item_answers_alone_and_lets_the_next_one_go() -> None:
    outbox = Outbox()
    items = [SendItem(0, "s0", "+1", "a"), SendItem(1, "unknown", "+1", "b"),
             SendItem(2, "s0", "+1", "c")]
    outcomes = await send_all(outbox.send, items)
    assert outcomes[0] == ("ok", 0) and outcomes[2] == ("ok", 2)
    assert isinstance(outcomes[1], BrokerError) and outcomes[1].reason == "SESSION_NOT_FOUND"


async def test_submit_waits_while_the_call_holds_max_in_flight_items() -> None:
    outbox = Outbox()
    flow = SendFlow(outbox.send, max_in_flight=4)
    for it in _items(40, sessions=40):
        await flow.submit(it)
    flow.close()
    total = sum([len(b) async for b in flow.results()])
    assert total == 40 and outbox.most_in_flight <= 4


async def test_a_bug_in_one_item_answers_it_internal() -> None:
    async def broken(item: SendItem, placed: Callable[[], None]) -> object:
        raise ValueError("bug")

    outcomes = await send_all(broken, _items(2))
    assert all(isinstance(o, BrokerError) and o.reason == "INTERNAL" for o in outcomes)
