"""`broker sessions import`: move an existing Baileys login into the broker's store.

Works on the store directly (not through a running broker: the folder holds
the account's keys, which never travel over the API). The SQLite database is
locked while a broker serves it, so that broker must be stopped; on Redis the
session must be stopped (or not run by any instance). Everything is written
unfenced, like an operator's other writes, in one key-value write.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import click

from broker import errors, validation
from broker.backends import open_store
from broker.config import Settings
from broker.datadir import DATA_DIR_ENV, default_data_dir, default_store_url
from broker.engines.baileys_auth import AuthFolderError, read_auth_folder
from broker.store.base import SessionRecord, Store
from broker.store.crypto import CredentialKeyError

KV_CREDENTIALS = {"engine": "baileys", "in": "kv"}
"""What `credentials` hold for a session whose login lives in its key-value area:
a marker (so `has_credentials` is true and the login is not treated as new); the
Baileys engine reads `creds` from the area and ignores it."""


@dataclass(frozen=True)
class Imported:
    keys: int
    skipped: list[str]
    created: bool


class ImportRefused(Exception):
    """The session cannot be imported into right now (the message says why)."""


async def import_folder(store: Store, session_id: str, folder: Path, tenant: str,
                        *, now: float) -> Imported:
    """Replace the session's key-value area with the folder's auth state."""
    validation.session_id(session_id)
    auth = read_auth_folder(folder)  # everything is read (and checked) before any write
    record = await store.get_session(session_id)
    created = record is None
    if record is None:
        # Created stopped: no broker may start it with half a login; restart it after.
        await store.create_session(SessionRecord(session_id, validation.tenant(tenant),
                                                 enabled=False, created_at=now))
    elif record.enabled and (live := await store.get_live(session_id)) is not None:
        raise ImportRefused(
            f"session {session_id!r} is running on instance {live.owner!r} "
            f"({live.state.value}); stop it first (`broker sessions stop {session_id}`), "
            "import, then `broker sessions restart` it")
    await store.kv_clear(session_id)
    await store.kv_set(session_id, dict(auth.entries))
    await store.save_credentials(session_id, dict(KV_CREDENTIALS))
    return Imported(auth.key_count, auth.skipped, created)


@click.command(name="import")
@click.argument("session_id")
@click.option("--baileys-auth-dir", "folder", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder written by Baileys' useMultiFileAuthState (creds.json and key "
                   "files); only read, never changed.")
@click.option("--store", "store_url", envvar="BROKER_STORE", default=None,
              show_default="sqlite:///<data dir>/broker.db",
              help="The broker's store: sqlite:///path/to/broker.db (its broker stopped) or "
                   "redis://host:port/db.")
@click.option("--data-dir", envvar=DATA_DIR_ENV, type=click.Path(file_okay=False),
              default=str(default_data_dir()), show_default=True)
@click.option("--key-prefix", envvar="BROKER_KEY_PREFIX", default="broker", show_default=True)
@click.option("--tenant", default="", help="Tenant of a session created by the import.")
def import_session(session_id: str, folder: Path, store_url: str | None, data_dir: str,
                   key_prefix: str, tenant: str) -> None:
    """Import an existing Baileys login into SESSION_ID's encrypted store, no scan needed."""
    url = store_url or default_store_url(Path(data_dir))
    if url in ("memory", "memory://", ""):
        raise click.ClickException("memory:// lives inside one broker process; import into "
                                   "its sqlite:// or redis:// store")

    async def go() -> Imported:
        store = open_store(Settings(store_url=url, key_prefix=key_prefix, data_dir=data_dir))
        try:
            return await import_folder(store, session_id, folder, tenant, now=time.time())
        finally:
            await store.close()

    try:
        done = asyncio.run(go())
    except (AuthFolderError, ImportRefused, CredentialKeyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except errors.BrokerError as exc:  # the database is in use, Redis is down
        raise click.ClickException(f"{exc.reason}: {exc.message}") from None
    click.echo(f"imported {session_id}: creds and {done.keys} keys from {folder}")
    if done.skipped:
        click.echo(f"left alone (not Baileys auth files): {', '.join(done.skipped)}", err=True)
    click.echo(f"start it with `broker sessions restart {session_id}` on a broker running "
               "--engine baileys" if done.created else
               f"restart it with `broker sessions restart {session_id}`", err=True)
