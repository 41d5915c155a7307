"""The simulator's logins on disk (issued tokens and bans), so a restarted
simulator still knows the sessions it paired."""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_logins(path: str | os.PathLike[str]) -> tuple[dict[str, str], set[str]]:
    """(tokens by login, banned logins); nothing yet when the file does not exist."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, set()
    except (OSError, ValueError) as exc:
        raise ValueError(f"simulator state file {path} is unreadable: {exc}") from None
    tokens = data.get("tokens", {}) if isinstance(data, dict) else {}
    banned = data.get("banned", []) if isinstance(data, dict) else []
    return {str(k): str(v) for k, v in tokens.items()}, {str(b) for b in banned}


def save_logins(path: str | os.PathLike[str], tokens: dict[str, str], banned: set[str]) -> None:
    """Atomically (write, sync, rename): a crash leaves the old file or the new one.

    Synchronous on purpose: it is small and changes only on pairing, logout and
    bans, and a token must be on disk before the client that holds it is."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    text = json.dumps({"tokens": tokens, "banned": sorted(banned)})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
