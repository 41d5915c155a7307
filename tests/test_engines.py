"""Engine selection: one factory maps --engine to a strategy, fills in the engine's
defaults (the rate limit on baileys), and refuses what cannot work with an error
that names the fix."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from broker.cli import main
from broker.config import Settings
from broker.engines import (
    BAILEYS_RATE_BURST,
    BAILEYS_RATE_LIMIT,
    EngineError,
    SimEngine,
    WsEngine,
    resolve,
    select_engine,
)


def test_the_default_is_the_simulator_and_a_url_means_ws() -> None:
    sim = resolve(Settings())
    assert (sim.engine, sim.rate_limit) == ("sim", 0.0)
    assert isinstance(select_engine(sim), SimEngine)
    ws = resolve(Settings(upstream_url="ws://127.0.0.1:1/v1/connect"))
    assert (ws.engine, ws.rate_limit) == ("ws", 0.0)
    engine = select_engine(ws)
    assert isinstance(engine, WsEngine) and engine.simulator is None


def test_baileys_is_rate_limited_by_default_and_an_explicit_limit_wins() -> None:
    baileys = resolve(Settings(engine="baileys"))
    assert (baileys.rate_limit, baileys.rate_burst) == (BAILEYS_RATE_LIMIT, BAILEYS_RATE_BURST)
    assert resolve(Settings(engine="baileys", rate_limit=0.0)).rate_limit == 0.0
    custom = resolve(Settings(engine="baileys", rate_limit=3.0, rate_burst=9))
    assert (custom.rate_limit, custom.rate_burst) == (3.0, 9)
    kept = resolve(Settings(engine="baileys", rate_burst=2))
    assert (kept.rate_limit, kept.rate_burst) == (BAILEYS_RATE_LIMIT, 2)


@pytest.mark.parametrize(("settings", "says"), [
    (Settings(engine="ws"), "--engine ws needs --upstream-url"),
    (Settings(engine="sim", upstream_url="ws://x"), "--upstream-url is for --engine ws"),
    (Settings(engine="whatsapp"), "unknown engine 'whatsapp'"),
])
def test_what_cannot_work_is_refused_with_the_fix(settings: Settings, says: str) -> None:
    with pytest.raises(EngineError, match=says):
        resolve(settings)


@pytest.mark.skipif(importlib.util.find_spec("broker.engines.baileys") is not None,
                    reason="the Baileys engine is installed")
def test_baileys_without_the_bridge_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match=r"broker\.engines\.baileys is missing"):
        select_engine(resolve(Settings(engine="baileys")))


def test_serve_refuses_a_bad_engine_without_a_traceback() -> None:
    result = CliRunner().invoke(main, ["serve", "--engine", "ws", "--store", "memory://",
                                       "--listen", "127.0.0.1:0"])
    assert result.exit_code != 0
    assert "--engine ws needs --upstream-url" in result.output
    assert "Traceback" not in result.output


def test_serve_help_names_the_engines() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for text in ("--engine", "sim", "ws", "baileys", "--wa-version", "--baileys-ws-url",
                 "--sent-retention"):
        assert text in result.output
