"""The key-value area as a running session's owner uses it: the actor hands it to
the provider fenced with its token, and wipes it (fenced) when the login is
logged out, through the real broker and simulator."""

from __future__ import annotations

import pytest

from broker.app import BrokerApp
from broker.errors import NotOwner
from broker.lifecycle.states import State
from broker.simulator import Simulator
from tests.helpers import eventually, paired_session, wait_state


async def test_logged_out_wipes_the_keys(sim: Simulator, broker: BrokerApp) -> None:
    sessions = [f"kv-{n}" for n in range(4)]
    assert broker.manager is not None
    for sid in sessions:
        await paired_session(broker, sim, sid)
        await broker.manager.actors[sid].kv.set({"creds": b"c", "pre-key:1": b"k"})
    for sid in sessions[:2]:
        await sim.logout(sid)
    for sid in sessions[:2]:
        await wait_state(broker, sid, State.LOGGED_OUT)
        assert await broker.manager.store.kv_get(sid, ["creds", "pre-key:1"]) == {}
    for sid in sessions[2:]:  # untouched sessions keep theirs
        assert await broker.manager.store.kv_get(sid, ["creds"]) == {"creds": b"c"}


async def test_an_operator_logout_of_an_unowned_session_wipes_its_keys(
    broker: BrokerApp,
) -> None:
    assert broker.manager is not None
    await broker.manager.create("kv-stopped", start=False)
    await broker.manager.store.kv_set("kv-stopped", {"creds": b"c"})
    await broker.manager.logout("kv-stopped")
    assert await broker.manager.store.kv_get("kv-stopped", ["creds"]) == {}


async def test_a_stale_owner_s_key_write_is_refused_and_stops_it(
    sim: Simulator, broker: BrokerApp,
) -> None:
    assert broker.manager is not None
    await paired_session(broker, sim, "kv-fenced")
    actor = broker.manager.actors["kv-fenced"]
    await broker.manager.store.new_fence("kv-fenced")  # another owner took over
    with pytest.raises(NotOwner):
        await actor.kv.set({"creds": b"stale"})
    await eventually(lambda: actor.fenced, what="the actor stops owning")
    assert await broker.manager.store.kv_get("kv-fenced", ["creds"]) == {}
