"""When a session's outbox writes linger: only while it is pipelined (several
messages awaiting acks), and for a moment after, never for one Send at a time.

The rule lives in the delivery window, which is given the time: no clock, no sleep.
"""

from __future__ import annotations

from broker.runtime.window import PIPELINED, PIPELINED_HOLD_S, DeliveryWindow
from broker.store.base import OutboxMessage


def _message(n: int) -> OutboxMessage:
    return OutboxMessage(session_id="s-1", message_id=f"m-{n}", to="+1", body="hi",
                         idempotency_key=f"k-{n}", sequence=n, accepted_at=0.0)


def _window() -> DeliveryWindow:
    window = DeliveryWindow(64, ack_timeout_s=5.0)
    window.open()
    return window


def _send(window: DeliveryWindow, n: int, now: float = 0.0) -> None:
    """Put messages 1..n in flight (on top of what is there)."""
    window.read_limit()
    window.read_done([_message(window.newest + i + 1) for i in range(n)])
    window.due(now)


def _ack_all_but(window: DeliveryWindow, keep: int) -> None:
    for n in range(1, window.newest - keep + 1):
        window.acked(f"m-{n}")


def test_one_send_at_a_time_never_lingers() -> None:
    for n in (0, 1, PIPELINED - 1):
        window = _window()
        _send(window, n)
        assert window.in_flight == n
        assert not window.pipelined(0.0)


def test_a_pipelined_session_lingers_while_anything_is_in_flight_for_a_moment() -> None:
    window = _window()
    _send(window, PIPELINED)
    assert window.pipelined(0.0)
    _ack_all_but(window, 1)  # right after a batch of acks: still pipelined
    assert window.in_flight == 1
    assert window.pipelined(0.0)
    window.acked(f"m-{window.newest}")  # nothing in flight: nothing is coming, write at once
    assert not window.pipelined(0.0)
    _send(window, 1)
    assert not window.pipelined(PIPELINED_HOLD_S * 1.5)  # the moment has passed
