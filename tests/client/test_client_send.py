"""send(): retries with one idempotency key, never retries the wrong codes, respects the budget."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from broker_client import (
    BrokerClient,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Message,
    NeedsPairing,
    NotDeliveredYet,
    ResourceExhausted,
    SendResult,
    SessionNotFound,
    Unavailable,
)

from .fake_broker import ScriptedBroker, not_delivered, rich_status

BOUND = 20.0  # every wait in these tests is bounded by this (seconds), never asserted on


async def test_send_retries_unavailable_with_same_key(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    broker.send_script = [
        not_delivered(),
        rich_status(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE", "redis down"),
    ]
    result = await asyncio.wait_for(client.send("s1", "alice", "hi"), BOUND)

    assert len(broker.send_requests) == 3
    keys = {r.idempotency_key for r in broker.send_requests}
    assert len(keys) == 1 and keys != {""}
    assert result.message_id == f"msg-{keys.pop()}"
    assert result.acked and result.duplicate and result.sequence == 7
    assert result.accepted_at is not None and result.accepted_at.tzinfo is not None
    assert result.acked_at is not None


async def test_each_send_call_gets_its_own_key(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    await client.send("s1", "alice", "one")
    await client.send("s1", "alice", "two", idempotency_key="k-fixed", wait=False)
    first, second = broker.send_requests
    assert first.idempotency_key != second.idempotency_key
    assert second.idempotency_key == "k-fixed" and second.no_wait and not first.no_wait


@pytest.mark.parametrize(
    ("status", "expected", "reason"),
    [
        (
            rich_status(
                grpc.StatusCode.FAILED_PRECONDITION,
                "NEEDS_PAIRING",
                "scan the QR code",
                metadata={"session_id": "s1"},
            ),
            NeedsPairing,
            "NEEDS_PAIRING",
        ),
        (
            rich_status(
                grpc.StatusCode.FAILED_PRECONDITION,
                "SESSION_STOPPED",
                "stopped",
                metadata={"session_id": "s1"},
            ),
            FailedPrecondition,
            "SESSION_STOPPED",
        ),
        (
            rich_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
                "body is empty",
                metadata={"session_id": "s1", "field": "body"},
            ),
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
    ],
)
async def test_send_does_not_retry_other_codes(
    broker: ScriptedBroker,
    client: BrokerClient,
    status: grpc.Status,
    expected: type[Exception],
    reason: str,
) -> None:
    broker.send_default = status
    with pytest.raises(expected) as info:
        await asyncio.wait_for(client.send("s1", "alice", "hi"), BOUND)
    err = info.value
    assert isinstance(err, FailedPrecondition | InvalidArgument)
    assert len(broker.send_requests) == 1
    assert err.reason == reason
    assert err.session_id == "s1"
    assert err.metadata["session_id"] == "s1"
    assert err.code == status.code
    if isinstance(err, InvalidArgument):
        assert err.metadata["field"] == "body"
        assert err.message == "body is empty"


async def test_send_gives_up_when_budget_spent(target: str, broker: ScriptedBroker) -> None:
    broker.send_default = not_delivered()
    # Attempts are effectively unlimited: only the 2 s budget can end this (long
    # enough that a loaded machine still fits several attempts into it).
    async with BrokerClient(target, retry_attempts=10_000) as client:
        with pytest.raises(NotDeliveredYet) as info:
            await asyncio.wait_for(client.send("s1", "alice", "hi", timeout=2.0), BOUND)
    assert info.value.reason == "NOT_DELIVERED_YET"
    assert 1 < len(broker.send_requests) < 10_000
    assert len({r.idempotency_key for r in broker.send_requests}) == 1
    # Each attempt's gRPC deadline is what is left of the budget, so it shrinks.
    deadlines = [d for d in broker.send_deadlines if d is not None]
    assert len(deadlines) == len(broker.send_requests)
    # (gRPC's timeout header rounds up to its unit: allow that much over the budget.)
    assert all(d <= 2.0 + 0.01 for d in deadlines)
    assert deadlines == sorted(deadlines, reverse=True)


async def test_send_budget_bounds_a_hanging_attempt(target: str, broker: ScriptedBroker) -> None:
    broker.send_hang = True
    async with BrokerClient(target, retry_attempts=5) as client:
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(client.send("s1", "alice", "hi", timeout=0.3), BOUND)
    assert len(broker.send_requests) == 1


async def test_retry_info_is_parsed_and_honoured(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    # A tiny server-requested delay: retried and succeeds.
    broker.send_script = [not_delivered(retry_after=0.01)]
    result = await asyncio.wait_for(client.send("s1", "alice", "hi"), BOUND)
    assert result.acked and len(broker.send_requests) == 2


@pytest.mark.parametrize("attempts", [1, 2, 4])
async def test_retryable_errors_take_exactly_the_attempts_allowed(
    target: str, broker: ScriptedBroker, attempts: int
) -> None:
    # The first attempt runs outside tenacity and its failure is replayed to it:
    # the bound must still count that attempt, no more and no fewer.
    broker.send_default = not_delivered(retry_after=0.01)
    async with BrokerClient(target, retry_attempts=attempts) as client:
        with pytest.raises(NotDeliveredYet):
            await asyncio.wait_for(client.send("s1", "alice", "hi", timeout=BOUND / 2), BOUND)
    assert len(broker.send_requests) == attempts
    assert len({r.idempotency_key for r in broker.send_requests}) == 1


async def test_retry_info_longer_than_budget_stops_at_once(
    target: str, broker: ScriptedBroker
) -> None:
    # The server asks for 30 s; the 5 s budget cannot fit another attempt,
    # so the client gives up right away instead of sleeping past its budget.
    broker.send_default = not_delivered(retry_after=30)
    async with BrokerClient(target, retry_attempts=5) as client:
        with pytest.raises(NotDeliveredYet) as info:
            await asyncio.wait_for(client.send("s1", "alice", "hi", timeout=5), BOUND)
    assert info.value.retry_after == pytest.approx(30)
    assert len(broker.send_requests) == 1


async def test_rate_limited_carries_retry_after_and_is_not_retried(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    broker.send_default = rich_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        metadata={"session_id": "s1"},
        retry_after=2.5,
    )
    with pytest.raises(ResourceExhausted) as info:
        await asyncio.wait_for(client.send("s1", "alice", "hi"), BOUND)
    assert info.value.reason == "RATE_LIMITED"
    assert info.value.retry_after == pytest.approx(2.5)
    assert len(broker.send_requests) == 1


async def test_transport_unavailable_is_retried_then_raised(dead_target: str) -> None:
    async with BrokerClient(dead_target, retry_attempts=3) as client:
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(client.send("s1", "alice", "hi", timeout=BOUND / 2), BOUND)
    assert info.value.reason == ""
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert not isinstance(info.value, NotDeliveredYet)


async def test_token_sent_as_bearer_metadata(target: str, broker: ScriptedBroker) -> None:
    async with BrokerClient(target, token="s3cret") as client:
        await client.send("s1", "alice", "hi")
        await client.get_session("s1")
    assert [m.get("authorization") for m in broker.metadata] == ["Bearer s3cret"] * 2


async def test_no_token_no_authorization(broker: ScriptedBroker, client: BrokerClient) -> None:
    await client.send("s1", "alice", "hi")
    assert "authorization" not in broker.metadata[0]


# -- send_many() without coalescing: SendBatch calls, in list order ------------------------

def _refs(broker: ScriptedBroker) -> list[list[int]]:
    return [[item.ref for item in request.items] for request in broker.batch_requests]


async def test_send_many_resends_only_retryable_items_with_their_keys(
    broker: ScriptedBroker, target: str
) -> None:
    late = (grpc.StatusCode.UNAVAILABLE, "NOT_DELIVERED_YET")
    broker.batch_script = [{1: late, 3: late}, {}]
    async with BrokerClient(target, coalesce=False, timeout=BOUND) as client:
        out = await client.send_many([Message(f"s{n % 2}", "alice", f"m{n}", f"k{n}")
                                      for n in range(4)])
    assert _refs(broker) == [[0, 1, 2, 3], [1, 3]]
    assert [r.message_id for r in out if isinstance(r, SendResult)] == \
        ["msg-k0", "msg-k1", "msg-k2", "msg-k3"]
    resent = [item.request.idempotency_key for item in broker.batch_requests[1].items]
    assert resent == ["k1", "k3"] and not broker.send_requests


async def test_send_many_stops_at_a_retryable_item_so_later_ones_never_overtake_it(
    broker: ScriptedBroker, target: str
) -> None:
    """Items travel in requests of up to 1 MiB; after a request with an item to
    retry, the rest wait for the retry, so no message of its session goes first."""
    late = (grpc.StatusCode.UNAVAILABLE, "NOT_DELIVERED_YET")
    broker.batch_script = [{0: late}, {}, {}]
    big = "x" * 400_000
    async with BrokerClient(target, coalesce=False, timeout=BOUND) as client:
        out = await client.send_many([Message("s1", "alice", big, f"k{n}") for n in range(5)])
    assert all(isinstance(r, SendResult) for r in out)
    assert _refs(broker) == [[0, 1], [0, 2], [3, 4]]  # two fit in 1 MiB


async def test_send_many_returns_each_items_last_error_when_retrying_stops(
    broker: ScriptedBroker, target: str
) -> None:
    late = (grpc.StatusCode.UNAVAILABLE, "NOT_DELIVERED_YET")
    down = rich_status(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    broker.batch_script = [{1: late}, down]
    async with BrokerClient(target, coalesce=False, timeout=BOUND, retry_attempts=2) as client:
        out = await client.send_many([Message("s1", "alice", f"m{n}", f"k{n}")
                                      for n in range(2)])
        broker.batch_script = [down, down]
        never = await client.send_many([Message("s1", "alice", "m2", "k2")])
    assert _refs(broker) == [[0, 1], [1], [0], [0]]
    # What the broker last said about each: queued, not acked yet, for k1.
    assert isinstance(out[0], SendResult) and isinstance(out[1], NotDeliveredYet)
    assert isinstance(never[0], Unavailable) and never[0].reason == "STORE_UNAVAILABLE"


async def test_send_many_retries_a_failed_call_and_types_errors_in_place(
    broker: ScriptedBroker, target: str
) -> None:
    broker.batch_script = [rich_status(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
                           {1: (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")}]
    async with BrokerClient(target, coalesce=False, timeout=BOUND) as client:
        out = await client.send_many([Message("s1", "alice", "m0", "k0"),
                                      Message("nope", "alice", "m1", "k1")])
    assert _refs(broker) == [[0, 1], [0, 1]]
    assert isinstance(out[0], SendResult) and isinstance(out[1], SessionNotFound)


async def test_send_many_on_a_broker_without_send_batch_sends_each_with_send(
    broker: ScriptedBroker, target: str
) -> None:
    async with BrokerClient(target, coalesce=False, timeout=BOUND) as client:
        out = await client.send_many([Message("s1", "alice", f"m{n}", f"k{n}")
                                      for n in range(3)])
        again = await client.send_many([Message("s1", "alice", "m3", "k3")])
    assert all(isinstance(r, SendResult) for r in out + again)
    assert sorted(r.idempotency_key for r in broker.send_requests) == ["k0", "k1", "k2", "k3"]
    assert broker.batch_refused == 1  # asked once, then remembered
