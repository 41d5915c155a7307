"""The status-update rules, without a store: the entry encoding, "furthest status
wins", and Health's delivered rate over the last hour."""

from __future__ import annotations

from broker.lifecycle.health import SessionStats
from broker.runtime.updates import MessageStatus, entry, from_record, latest
from broker.store.base import InboundRecord


def _stored(n: int, message_id: str, status: MessageStatus, at: float, code: int = 0,
            reason: str = "") -> InboundRecord:
    new = entry(message_id, status, code, reason)
    return InboundRecord("s1", f"{n}-0", new.upstream_id, new.sender, new.body, at)


def test_an_update_round_trips_through_its_entry() -> None:
    for status in MessageStatus:
        record = _stored(7, "m-1", status, 12.5, 463, "no privacy token")
        update = from_record(record)
        assert (update.session_id, update.message_id, update.status, update.at,
                update.update_id) == ("s1", "m-1", status, 12.5, "7-0")
        refused = status is MessageStatus.REFUSED
        assert (update.code, update.reason) == ((463, "no privacy token") if refused else (0, ""))
    # one entry per message and status: a repeated receipt has the same de-dup key
    assert entry("m-1", MessageStatus.READ) == entry("m-1", MessageStatus.READ)
    read = MessageStatus.READ
    assert entry("m-1", read).upstream_id != entry("m-2", read).upstream_id
    assert from_record(_stored(1, "m:1", MessageStatus.REFUSED, 1.0, 0, "")).reason == "refused"


def test_the_furthest_status_wins_and_a_refusal_is_final() -> None:
    ack = _stored(1, "m-1", MessageStatus.SERVER_ACK, 1.0)
    read = _stored(3, "m-1", MessageStatus.READ, 3.0)
    delivered = _stored(2, "m-1", MessageStatus.DELIVERED, 2.0)
    assert latest([]) is None
    found = latest([read, ack, delivered])
    assert found is not None and found.status is MessageStatus.READ
    refused = _stored(4, "m-1", MessageStatus.REFUSED, 0.5, 475, "too many")
    found = latest([read, refused])
    assert found is not None and (found.status, found.code) == (MessageStatus.REFUSED, 475)


def test_the_delivered_rate_counts_the_last_hour() -> None:
    stats = SessionStats()
    now = 1_000_000.0
    assert stats.delivered_rate(now) == 1.0  # nothing sent yet
    stats.on_acked(10, now - 7200)  # two hours ago: outside the window
    stats.on_acked(20, now - 120)
    stats.on_delivered(19, now - 60)
    assert stats.delivered_rate(now) == 19 / 20
    assert stats.counters(now).messages_delivered == 19
    assert stats.counters(now).delivered_rate_last_hour == 19 / 20
    assert stats.delivered_rate(now + 3600) == 1.0  # an hour on, all of it aged out
    assert stats.minutes is not None and len(stats.minutes) <= 60  # bounded
    for minute in range(500):
        stats.on_acked(1, now + minute * 60)
    assert len(stats.minutes) == 60
