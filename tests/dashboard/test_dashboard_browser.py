"""The dashboard as a person sees it: a real headless Chromium on loopback.

A session is created, its QR image shows, the simulator's phone scans it, the
row turns OPEN; a forced drop shows RECONNECTING and then OPEN again. The page
records every state a row showed (window.stateHistory), so a RECONNECTING
that lasts a few milliseconds is not missed between two DOM polls.

Selenium is blocking and the broker runs on this test's event loop, so every
browser call goes through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.app import BrokerApp
from broker.simulator import Simulator
from broker_client import BrokerClient
from tests.conftest import BrokerFactory

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
)
SID = "962302"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them)",
)


def _start_chromium(profile: Path) -> Any:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1200,640", f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    return driver


@pytest.fixture
async def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    # Selenium Manager must not try to fetch a driver: there is no internet here.
    monkeypatch.setenv("SE_OFFLINE", "true")
    driver = await asyncio.to_thread(_start_chromium, tmp_path / "profile")
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


async def js(driver: Any, script: str) -> Any:
    return await asyncio.to_thread(driver.execute_script, script)


async def until(driver: Any, script: str, what: str, timeout: float = 15.0) -> Any:
    """Poll a JS expression (`return ...`) until truthy, within a bounded time."""
    deadline = time.monotonic() + timeout
    while True:
        value = await js(driver, script)
        if value:
            return value
        if time.monotonic() > deadline:
            history = await js(driver, "return window.stateHistory")
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                 f"states seen: {history}")
        await asyncio.sleep(0.05)


def _row_state(sid: str) -> str:
    return f"const r = document.getElementById('row-{sid}'); return r && r.dataset.state;"


async def test_dashboard_shows_pairing_qr_then_rides_out_a_drop(
    sim: Simulator, make_broker: BrokerFactory, browser: Any, tmp_path: Path
) -> None:
    app: BrokerApp = await make_broker(dashboard_listen="127.0.0.1:0")
    assert app.dashboard is not None
    await asyncio.to_thread(browser.get, app.dashboard.url)
    await until(browser, "return document.getElementById('conn').className === 'live'",
                "the page's websocket to connect")

    async with BrokerClient(app.address) as client:
        await client.create_session(SID)

    # The row shows PAIRING with a QR image the browser actually loaded and decoded.
    await until(browser, f"""
        const img = document.querySelector('#row-{SID} img.qr');
        return !!img && img.complete && img.naturalWidth > 0;
    """, "the pairing QR image")
    assert await js(browser, _row_state(SID)) == "PAIRING"
    await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "pairing.png"))

    assert await sim.scan(SID)
    await until(browser, f"return document.getElementById('row-{SID}').dataset.state === 'OPEN'",
                "the row to turn OPEN")
    assert await js(browser, f"return document.querySelector('#row-{SID} img.qr')") is None

    assert await sim.drop(SID)
    history_after_drop = f"""
        const h = window.stateHistory['{SID}'] || [];
        const firstOpen = h.indexOf('OPEN');
        const again = h.indexOf('RECONNECTING', firstOpen);
        return again > firstOpen && h.indexOf('OPEN', again) > again
            && document.getElementById('row-{SID}').dataset.state === 'OPEN';
    """
    await until(browser, history_after_drop, "RECONNECTING, then OPEN again")
    history: list[str] = await js(browser, f"return window.stateHistory['{SID}']")
    assert history[:1] != ["OPEN"] and "PAIRING" in history
    assert history.index("PAIRING") < history.index("OPEN")
    await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "open.png"))
    assert (tmp_path / "pairing.png").stat().st_size > 0
