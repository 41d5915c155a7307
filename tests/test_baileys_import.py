"""`broker sessions import --baileys-auth-dir`: a folder written by Baileys' own
`useMultiFileAuthState` (tests/fixtures/baileys_auth, made by
tests/fixtures/make_baileys_auth.mjs with baileys 7.0.0-rc14) lands in the
session's sealed key-value area as exactly the entries the Baileys engine
stores; the folder is never changed; running sessions and bad folders are
refused with clear errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import main
from broker.commands.import_session import ImportRefused, import_folder
from broker.datadir import sqlite_cipher
from broker.engines.baileys_auth import AuthFolderError, key_name, read_auth_folder
from broker.lifecycle.states import State
from broker.store.base import LiveState, SessionRecord
from broker.store.sqlite import SqliteStore
from tests.redis_server import RedisServer, shared_redis, shared_redis_server  # noqa: F401
from tests.store.conftest import open_redis

FIXTURES = Path(__file__).parent / "fixtures"
FOLDER = FIXTURES / "baileys_auth"
GENERATOR = FIXTURES / "make_baileys_auth.mjs"
REPO = Path(__file__).resolve().parents[1]


def _expected(path: Path = FIXTURES / "baileys_auth.expected.json") -> dict[str, bytes]:
    return {k: v.encode() for k, v in json.loads(path.read_text()).items()}


def _fingerprint(folder: Path) -> list[tuple[str, str, int]]:
    return [(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())]


def test_file_names_map_back_to_baileys_ids() -> None:
    assert key_name("creds.json") == "creds"
    assert key_name("pre-key-17.json") == "pre-key:17"
    assert key_name("sender-key-memory-1203@g.us.json") == "sender-key-memory:1203@g.us"
    assert key_name("sender-key-1203@g.us--4915--0.json") == "sender-key:1203@g.us::4915::0"
    assert key_name("app-state-sync-key-AAAAAD__x+k8=.json") == "app-state-sync-key:AAAAAD/x+k8="
    assert key_name("sender-key-memory-4915-1612345678@g.us.json") == \
        "sender-key-memory:4915-1612345678@g.us"
    assert key_name("notes.txt") is None and key_name("pre-key-.json") is None
    assert key_name("unknown-type-1.json") is None


def test_the_fixture_reads_as_what_baileys_wrote() -> None:
    before = _fingerprint(FOLDER)
    auth = read_auth_folder(FOLDER)
    assert auth.entries == _expected()
    assert auth.key_count == len(auth.entries) - 1 and not auth.skipped
    assert _fingerprint(FOLDER) == before


def test_bad_folders_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(AuthFolderError, match=r"holds no creds\.json"):
        read_auth_folder(tmp_path)
    (tmp_path / "creds.json").write_text('{"noiseKey": {}}')
    with pytest.raises(AuthFolderError, match="lacks signedIdentityKey"):
        read_auth_folder(tmp_path)
    shutil.copy(FOLDER / "creds.json", tmp_path / "creds.json")
    (tmp_path / "pre-key-1.json").write_bytes(b"\xff not json")
    with pytest.raises(AuthFolderError, match=r"pre-key-1\.json is not JSON"):
        read_auth_folder(tmp_path)
    (tmp_path / "pre-key-1.json").write_text("{}")
    (tmp_path / ".DS_Store").write_text("x")
    assert read_auth_folder(tmp_path).skipped == [".DS_Store"]


def test_the_cli_imports_into_sqlite_sealed(tmp_path: Path) -> None:
    folder = tmp_path / "baileys_auth_info" / "company_962302"
    shutil.copytree(FOLDER, folder)
    before = _fingerprint(folder)
    database = tmp_path / "data" / "broker.db"
    result = CliRunner().invoke(main, [
        "sessions", "import", "962302", "--baileys-auth-dir", str(folder),
        "--store", f"sqlite://{database}", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert f"creds and {len(_expected()) - 1} keys" in result.output
    assert _fingerprint(folder) == before, "the folder is never modified"
    raw = b"".join(p.read_bytes() for p in database.parent.glob("broker.db*") if p.is_file())
    private = json.loads(_expected()["creds"])["noiseKey"]["private"]["data"]
    assert private.encode() not in raw and b"session record bytes" not in raw

    async def check() -> None:
        store = SqliteStore(database, cipher=sqlite_cipher(database))
        try:
            expected = _expected()
            assert await store.kv_get("962302", list(expected)) == expected
            record = await store.get_session("962302")
            assert record is not None and not record.enabled  # created stopped
            assert await store.has_credentials("962302")
        finally:
            await store.close()

    asyncio.run(check())


def test_a_database_in_use_is_refused(tmp_path: Path) -> None:
    """A broker holds its SQLite database: the import says so and writes nothing."""
    database = tmp_path / "broker.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import asyncio, sys\n"
            "from pathlib import Path\n"
            "from broker.datadir import sqlite_cipher\n"
            "from broker.store.sqlite import SqliteStore\n"
            "async def hold():\n"
            f"    s = SqliteStore(Path({str(database)!r}), "
            f"cipher=sqlite_cipher(Path({str(database)!r})))\n"
            "    await s.open(); print('held', flush=True); sys.stdin.read()\n"
            "asyncio.run(hold())\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(main, [
            "sessions", "import", "s1", "--baileys-auth-dir", str(FOLDER),
            "--store", f"sqlite://{database}", "--data-dir", str(tmp_path)])
        assert result.exit_code != 0
        assert "STORE_IN_USE" in result.output and "Traceback" not in result.output
    finally:
        holder.communicate("", timeout=30)


@pytest.mark.redis
async def test_redis_refuses_a_running_session_and_imports_a_stopped_one(
    shared_redis: RedisServer,  # noqa: F811
) -> None:
    store = open_redis(shared_redis)
    try:
        await store.create_session(SessionRecord("imp-1", "t1", enabled=True))
        await store.report_live("imp-1", LiveState(State.OPEN, "broker-a", 1.0, 1.0), 30.0)
        with pytest.raises(ImportRefused, match=r"running on instance 'broker-a'.*stop it"):
            await import_folder(store, "imp-1", FOLDER, "", now=1.0)
        assert await store.kv_get("imp-1", ["creds"]) == {}
        await store.set_enabled("imp-1", False)
        await store.kv_set("imp-1", {"pre-key:999": b"left over from an older login"})
        done = await import_folder(store, "imp-1", FOLDER, "", now=1.0)
        assert not done.created
        expected = _expected()
        assert await store.kv_get("imp-1", [*expected, "pre-key:999"]) == expected
        raw = await store.client.hget(store.keys.kv("imp-1"), "creds")
        assert isinstance(raw, bytes) and b"noiseKey" not in raw
    finally:
        await store.delete_session("imp-1")
        await store.close()


def _baileys_package() -> Path | None:
    candidates = [os.environ.get("BAILEYS_PACKAGE_DIR", ""),
                  str(REPO / "engines" / "baileys" / "node_modules" / "baileys")]
    return next((Path(c) for c in candidates if c and (Path(c) / "lib" / "index.js").is_file()),
                None)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_a_folder_written_now_by_real_baileys_imports_exactly(tmp_path: Path) -> None:
    package = _baileys_package()
    if package is None:
        pytest.skip("baileys is not installed: run `npm ci` in engines/baileys (or set "
                    "BAILEYS_PACKAGE_DIR to an installed baileys package)")
    folder = tmp_path / "auth"
    made = subprocess.run(["node", str(GENERATOR), str(package), str(folder)],
                          capture_output=True, text=True, timeout=120, check=True)
    expected = {k: v.encode() for k, v in json.loads(made.stdout).items()}
    assert read_auth_folder(folder).entries == expected
