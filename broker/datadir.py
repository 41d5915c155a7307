"""Where `broker serve` keeps its files when nobody configured anything.

The data directory holds the default SQLite database (`broker.db`), the key
that seals the credentials stored in it (`credentials.key`), and the embedded
simulator's logins (`simulator.json`). It is `--data-dir` / `BROKER_DATA_DIR`,
by default the user's data folder: ``$XDG_DATA_HOME/session-broker`` (else
``~/.local/share/session-broker``) on Linux, ``~/Library/Application
Support/session-broker`` on macOS, ``%LOCALAPPDATA%\\session-broker`` on Windows.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import sys
from pathlib import Path

from broker.store.crypto import CredentialCipher, CredentialKeyError, key_id_for, parse_keys

log = logging.getLogger(__name__)

APP_DIR = "session-broker"
DATA_DIR_ENV = "BROKER_DATA_DIR"
DATABASE_NAME = "broker.db"
KEY_FILE_NAME = "credentials.key"
SIMULATOR_STATE_NAME = "simulator.json"


def default_data_dir() -> Path:
    """The user's data folder for the broker (see the module docstring)."""
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / APP_DIR
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / APP_DIR
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"
    return base / APP_DIR


def ensure_dir(path: Path) -> Path:
    """Create the directory (owner-only: it holds credentials) if it is missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def sqlite_url(path: Path) -> str:
    return f"sqlite://{path}"


def default_store_url(data_dir: Path) -> str:
    return sqlite_url(data_dir / DATABASE_NAME)


def sqlite_path(url: str) -> Path:
    """`sqlite:///abs/path.db` (or `sqlite://relative.db`) to the file's path."""
    rest = url.removeprefix("sqlite://")
    if not rest or rest == url:
        raise ValueError(f"unsupported SQLite URL {url!r} (use sqlite:///path/to/broker.db)")
    return Path(rest).expanduser()


def key_file_for(database: Path) -> Path:
    """The credential key lives beside the database it seals."""
    return database.with_name(KEY_FILE_NAME)


def load_or_create_key(path: Path) -> CredentialCipher:
    """The cipher of the key file, created (mode 0600) on first start.

    Created with O_EXCL, so two starts racing never end up with two keys."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    key = os.urandom(32)
    try:
        os.write(fd, f"{key_id_for(key)}:{base64.b64encode(key).decode()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning(
        "created the credential key file %s (mode 0600): it encrypts the session credentials "
        "stored beside it. Back it up with the database and keep it secret; if it is lost, "
        "every session must be paired again", path)
    return CredentialCipher.from_key(key)


def _read_key(path: Path) -> CredentialCipher:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the credential key file %s is readable by others (mode %o); "
                    "chmod 600 it", path, stat.S_IMODE(mode))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialKeyError(f"the credential key file {path} cannot be read: "
                                 f"{exc.strerror}") from None
    return CredentialCipher(*parse_keys(text, f"the credential key file {path}"))


def sqlite_cipher(database: Path) -> CredentialCipher:
    """Keys from BROKER_CREDENTIAL_KEYS / _KEY_FILE if set, else the key file beside
    the database: zero configuration still never stores credentials in clear."""
    configured = CredentialCipher.from_env()
    if configured is not None:
        return configured
    ensure_dir(database.parent)
    return load_or_create_key(key_file_for(database))
