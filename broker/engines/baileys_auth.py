"""Reading a folder written by Baileys' `useMultiFileAuthState` into key-value
entries of the session's area (`broker.store.kv`), for `broker sessions import`.

The folder holds ``creds.json`` and one ``<type>-<id>.json`` per signal key,
each the `JSON.stringify(value, BufferJSON.replacer)` text (binary as
``{"type": "Buffer", "data": "<base64>"}``). Baileys names a key's file with
its id's ``/`` replaced by ``__`` and ``:`` by ``-``; the entries are keyed
``creds`` and ``<type>:<id>`` with the id Baileys itself uses, so the import
undoes that: ``__`` back to ``/`` (app-state key ids are base64) and ``--``
back to ``::`` (sender-key ids are ``<group>::<user>::<device>``); a single
``-`` stays (group ids such as ``4915...-1612345678@g.us`` hold one). Values
are the files' text as UTF-8 bytes, exactly what the Baileys engine stores.

Pure reading: the folder is never written to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

KEY_TYPES = (
    "pre-key", "session", "sender-key", "sender-key-memory", "app-state-sync-key",
    "app-state-sync-version", "lid-mapping", "device-list", "tctoken", "identity-key",
)
"""Baileys 7's `SignalDataTypeMap` keys (src/Types/Auth.ts)."""
_BY_LENGTH = sorted(KEY_TYPES, key=len, reverse=True)
"""Longest first: "sender-key-memory-x" is a sender-key-memory, not a sender-key."""
CREDS_FILE = "creds.json"
CREDS_KEY = "creds"
_CREDS_FIELDS = ("noiseKey", "signedIdentityKey", "signedPreKey", "registrationId")
MAX_FILE_BYTES = 4 << 20
"""A key file is a few KB; anything far larger is not one (and is refused, not read)."""


class AuthFolderError(ValueError):
    """The folder is not a readable Baileys auth folder (the message says why)."""


@dataclass
class AuthFolder:
    entries: dict[str, bytes] = field(default_factory=dict)
    """Key name -> value, `creds` first."""
    skipped: list[str] = field(default_factory=list)
    """File names that are not Baileys auth files (left alone, not imported)."""

    @property
    def key_count(self) -> int:
        return len(self.entries) - (CREDS_KEY in self.entries)


def key_name(file_name: str) -> str | None:
    """The entry key of one file of the folder, None if it is not an auth file."""
    if file_name == CREDS_FILE:
        return CREDS_KEY
    if not file_name.endswith(".json"):
        return None
    stem = file_name[: -len(".json")]
    for key_type in _BY_LENGTH:
        if stem.startswith(key_type + "-") and len(stem) > len(key_type) + 1:
            raw_id = stem[len(key_type) + 1:]
            return f"{key_type}:{raw_id.replace('__', '/').replace('--', '::')}"
    return None


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise AuthFolderError(f"{path.name} is larger than {MAX_FILE_BYTES} bytes: not a "
                                  "Baileys auth file")
        data = path.read_bytes()
    except OSError as exc:
        raise AuthFolderError(f"cannot read {path}: {exc.strerror}") from None
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AuthFolderError(f"{path.name} is not JSON text: not a Baileys auth file") from None
    return data


def read_auth_folder(folder: Path) -> AuthFolder:
    """Every auth file of `folder` as entries; raises AuthFolderError."""
    if not folder.is_dir():
        raise AuthFolderError(f"{folder} is not a directory")
    creds_path = folder / CREDS_FILE
    if not creds_path.is_file():
        raise AuthFolderError(f"{folder} holds no {CREDS_FILE}: not a folder written by "
                              "Baileys' useMultiFileAuthState")
    out = AuthFolder()
    creds = _read(creds_path)
    parsed = json.loads(creds)
    missing = [f for f in _CREDS_FIELDS if not isinstance(parsed, dict) or f not in parsed]
    if missing:
        raise AuthFolderError(f"{creds_path} lacks {', '.join(missing)}: not Baileys "
                              "credentials")
    out.entries[CREDS_KEY] = creds
    for path in sorted(folder.iterdir()):
        if path.name == CREDS_FILE:
            continue
        name = key_name(path.name) if path.is_file() else None
        if name is None:
            out.skipped.append(path.name)
            continue
        out.entries[name] = _read(path)
    return out
