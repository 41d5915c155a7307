"""The dashboard as a person sees it: a real headless Chromium on loopback.

Without auth: a session is created, its QR image shows, the simulator's phone
scans it, the row turns OPEN; a forced drop shows RECONNECTING and then OPEN
again. With auth: an admin signs in, creates and pairs a session from the
page, opens its session page (recommendations, plots with data) and logs it
out (confirmed); a viewer sees the same table with every action disabled.
The page records every state a row showed (window.stateHistory), so a
RECONNECTING that lasts a few milliseconds is not missed between two DOM polls.

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
from broker.auth.tokens import Role
from broker.simulator import Simulator
from broker_client import BrokerClient
from tests.conftest import BrokerFactory
from tests.ops.auth_fixtures import Tokens, token_file

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


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return token_file(tmp_path / "tokens.json", {
        "admin": (Role.ADMIN, ("*",), None),
        "viewer": (Role.VIEWER, ("*",), None),
    })


async def type_into(driver: Any, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    element = await asyncio.to_thread(driver.find_element, By.ID, element_id)
    await asyncio.to_thread(element.send_keys, text)


async def click(driver: Any, css: str) -> None:
    from selenium.webdriver.common.by import By

    element = await asyncio.to_thread(driver.find_element, By.CSS_SELECTOR, css)
    await asyncio.to_thread(element.click)


async def sign_in(driver: Any, app: BrokerApp, token: str) -> None:
    assert app.dashboard is not None
    await asyncio.to_thread(driver.get, app.dashboard.url)
    await until(driver, "return !document.getElementById('signin').hidden", "the sign-in form")
    await type_into(driver, "token", token)
    await click(driver, "#signin-btn")
    await until(driver, "return document.getElementById('conn').className === 'live'",
                "the page's websocket to connect after sign-in")


async def test_admin_creates_pairs_inspects_and_logs_out_a_session(
    sim: Simulator, make_broker: BrokerFactory, browser: Any, tokens: Tokens, tmp_path: Path
) -> None:
    app = await make_broker(dashboard_listen="127.0.0.1:0", auth_tokens_file=str(tokens.path))
    await sign_in(browser, app, tokens["admin"])
    assert await js(browser, "return document.getElementById('who').textContent") \
        == "signed in: admin"
    # The token is only in the tab's memory.
    assert await js(browser, "return localStorage.length + sessionStorage.length") == 0
    assert await js(browser, "return document.cookie") == ""

    await type_into(browser, "new-session", SID)
    await click(browser, "#create-btn")
    await until(browser, f"""
        const img = document.querySelector('#row-{SID} img.qr');
        return !!img && img.complete && img.naturalWidth > 0;
    """, "the pairing QR image (fetched with the token)")
    assert await sim.scan(SID)
    await until(browser, f"return document.getElementById('row-{SID}').dataset.state === 'OPEN'",
                "the row to turn OPEN")

    # The session page: plots fill while it is open and messages flow.
    await click(browser, f"#row-{SID} td.id a")
    await until(browser, "return !document.getElementById('detail').hidden "
                "&& !!window.plots.outbox", "the session page and its plots")
    async with BrokerClient(app.address, token=tokens["admin"]) as client:
        for n in range(3):
            await client.send(SID, "+15550001", f"order {n} shipped")
    await until(browser, """
        const m = window.plots.messages;
        return !!m && m.data[1].some((v) => v > 0) && m.data[2].some((v) => v > 0);
    """, "messages sent and acked per minute to be plotted")
    await until(browser, "return window.plots.outbox.data[0].length >= 2",
                "outbox depth samples")
    states = await js(browser, "return window.plots.state.data[1]")
    assert 3 in states  # OPEN (index in the page's STATES) is on the state line
    await js(browser, "document.getElementById('plot-state').scrollIntoView()")
    await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "session.png"))

    # Back to the table; log out from the page, confirming in the dialog.
    await click(browser, "#home")
    await until(browser, "return !document.getElementById('list').hidden", "the table")
    await click(browser, f'#row-{SID} button[data-action="logout"]')
    await until(browser, "return document.getElementById('confirm').open", "the confirmation")
    assert SID in await js(browser, "return document.getElementById('confirm-text').textContent")
    await click(browser, "#confirm-yes")
    await until(browser,
                f"return document.getElementById('row-{SID}').dataset.state === 'LOGGED_OUT'",
                "the row to turn LOGGED_OUT")

    # Its session page now says what to do, in plain words.
    await click(browser, f"#row-{SID} td.id a")
    await until(browser, """
        const items = [...document.querySelectorAll('#recs li')].map((li) => li.textContent);
        return items.some((t) => /pair|QR|scan/i.test(t));
    """, "a recommendation to pair again")
    assert await js(browser, "return document.getElementById('error').hidden")


async def test_viewer_sees_the_table_with_actions_disabled(
    sim: Simulator, make_broker: BrokerFactory, browser: Any, tokens: Tokens
) -> None:
    app = await make_broker(dashboard_listen="127.0.0.1:0", auth_tokens_file=str(tokens.path))
    async with BrokerClient(app.address, token=tokens["admin"]) as client:
        await client.create_session(SID)
    await sign_in(browser, app, tokens["viewer"])
    assert await js(browser, "return document.getElementById('who').textContent") \
        == "signed in: viewer"
    await until(browser, f"return document.getElementById('row-{SID}')?.dataset.state "
                "=== 'PAIRING'", "the session's row")
    await until(browser, f"return !!document.querySelector('#row-{SID} img.qr')",
                "the QR, which a viewer may see")
    buttons = await js(browser, f"""
        return [...document.querySelectorAll('#row-{SID} td.actions button')]
            .map((b) => [b.dataset.action, b.disabled]);
    """)
    assert {action for action, _ in buttons} >= {"pair", "restart", "stop", "logout", "delete"}
    assert all(disabled for _, disabled in buttons), buttons
    assert await js(browser, "return document.getElementById('create-btn').disabled")
    assert await sim.scan(SID)
    await until(browser, f"return document.getElementById('row-{SID}').dataset.state === 'OPEN'",
                "the row to turn OPEN for the viewer too")

    # Signing out forgets the token: the page asks again and shows nothing.
    await click(browser, "#signout")
    await until(browser, "return !document.getElementById('signin').hidden "
                f"&& !document.getElementById('row-{SID}')", "the sign-in form again")
