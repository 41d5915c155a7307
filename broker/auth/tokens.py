"""API tokens: roles, tenant scopes, and the hashed token file.

A token is ``brk_<id>_<secret>``: the id is public (logs and errors may name
it), the secret is 256 random bits. Only the SHA-256 of the whole token is
stored; a plain hash is enough because the token is high-entropy, so there is
nothing to brute-force that a slow KDF would protect. The file is JSON, written
atomically with mode 0600, and re-read when it changes, so a token created or
revoked with ``broker token`` takes effect on a running broker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from broker.errors import ErrorReason, Unauthenticated

log = logging.getLogger(__name__)

PREFIX = "brk"
ALL_TENANTS = "*"
FILE_VERSION = 1
_TOKEN = re.compile(r"^brk_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})$")
_DUMMY_HASH = hashlib.sha256(b"no such token").hexdigest()
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Role(StrEnum):
    WORKER = "worker"
    VIEWER = "viewer"
    ADMIN = "admin"


class Permission(StrEnum):
    SEND = "send"
    """Send, SendStream, SendBatch, Receive, AckInbound."""
    VIEW = "view"
    """StreamStatus, Health, GetSession, ListSessions, GetQr."""
    MANAGE = "manage"
    """Create, Stop, Logout, Restart, Delete, RequestPairingCode."""


ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    Role.WORKER: frozenset({Permission.SEND}),
    Role.VIEWER: frozenset({Permission.VIEW}),
    Role.ADMIN: frozenset(Permission),
}


class TokenFileError(ValueError):
    """The token file is missing or unreadable: a configuration error, shown at startup."""


@dataclass(frozen=True)
class TokenRecord:
    """One stored token; never holds the token itself."""

    id: str
    role: Role
    tenants: tuple[str, ...]
    sha256: str
    name: str = ""
    created_at: float = 0.0
    expires_at: float | None = None

    @property
    def all_tenants(self) -> bool:
        return ALL_TENANTS in self.tenants

    def allows_tenant(self, tenant: str) -> bool:
        return self.all_tenants or tenant in self.tenants

    def may(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "role": self.role.value,
            "tenants": list(self.tenants), "sha256": self.sha256,
            "created_at": self.created_at, "expires_at": self.expires_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenRecord:
        tenants = data["tenants"]
        if not isinstance(tenants, list) or not tenants or not all(
            isinstance(t, str) and t for t in tenants
        ):
            raise ValueError(f"token {data.get('id')!r}: tenants must be a non-empty list")
        sha = str(data["sha256"])
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"token {data.get('id')!r}: sha256 must be 64 hex digits")
        expires = data.get("expires_at")
        return cls(
            id=str(data["id"]), role=Role(data["role"]), tenants=tuple(tenants), sha256=sha,
            name=str(data.get("name", "")), created_at=float(data.get("created_at", 0.0)),
            expires_at=float(expires) if expires is not None else None,
        )


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(
    role: Role, tenants: Iterable[str], *, name: str = "", ttl_s: float | None = None,
    now: float | None = None,
) -> tuple[str, TokenRecord]:
    """A fresh token and the record to store; the token is shown once and never kept."""
    created = time.time() if now is None else now
    token_id = secrets.token_hex(8)
    token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    scope = tuple(dict.fromkeys(tenants))
    if not scope:
        raise ValueError("a token needs at least one tenant (or '*')")
    record = TokenRecord(
        id=token_id, role=role, tenants=scope, sha256=hash_token(token), name=name,
        created_at=created, expires_at=created + ttl_s if ttl_s else None,
    )
    return token, record


def parse_ttl(text: str) -> float:
    """'30d', '12h', '15m', '90s', '2w' or plain seconds."""
    match = _TTL.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"bad TTL {text!r}: use e.g. 90s, 15m, 12h, 30d, 2w")
    return float(match.group(1)) * _TTL_UNITS[match.group(2)]


def read_records(path: Path) -> list[TokenRecord]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TokenFileError(f"token file {path} does not exist "
                             "(create one with `broker token create`)") from exc
    except (OSError, ValueError) as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc}") from exc
    try:
        if raw.get("version") != FILE_VERSION:
            raise ValueError(f"unsupported version {raw.get('version')!r}")
        return [TokenRecord.from_json(item) for item in raw["tokens"]]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise TokenFileError(f"token file {path} is invalid: {exc}") from exc


def write_records(path: Path, records: Iterable[TokenRecord]) -> None:
    """Atomic replace with mode 0600, so a reading broker never sees half a file."""
    payload = {"version": FILE_VERSION, "tokens": [r.to_json() for r in records]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=2)
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_record(path: Path, record: TokenRecord) -> None:
    records = read_records(path) if path.exists() else []
    write_records(path, [*records, record])


@dataclass
class TokenStore:
    """The tokens a broker accepts, re-read from their file when it changes."""

    path: Path
    clock: Callable[[], float] = time.time
    recheck_s: float = 1.0
    _by_id: dict[str, TokenRecord] = field(default_factory=dict, init=False)
    _stamp: tuple[int, int] | None = field(default=None, init=False)
    _checked_at: float = field(default=float("-inf"), init=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> TokenStore:
        """Load now so a bad file fails the start, not the first call."""
        store = cls(Path(path), **kwargs)
        store._load()
        if not store._by_id:
            log.warning("token file %s holds no tokens: every call is refused until one is "
                        "created with `broker token create`", store.path)
        return store

    def __len__(self) -> int:
        return len(self._by_id)

    def _load(self) -> None:
        stat = self.path.stat() if self.path.exists() else None
        records = read_records(self.path)
        self._by_id = {r.id: r for r in records}
        self._stamp = (stat.st_mtime_ns, stat.st_size) if stat else None

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.recheck_s:
            return
        self._checked_at = now
        try:
            stat = self.path.stat()
        except OSError:
            return  # keep the last good set rather than lock everybody out
        if (stat.st_mtime_ns, stat.st_size) == self._stamp:
            return
        try:
            self._load()
            log.info("token file %s reloaded: %d tokens", self.path, len(self._by_id))
        except TokenFileError as exc:
            log.warning("keeping the previous tokens: %s", exc)

    def authenticate(self, authorization: str | None) -> TokenRecord:
        """The record of a valid bearer token, else Unauthenticated with a precise reason.

        Messages never repeat what the caller sent: a mistyped header may hold a secret.
        """
        if authorization is None:
            raise Unauthenticated(
                "no bearer token: send the metadata 'authorization: Bearer <token>'",
                reason=ErrorReason.TOKEN_MISSING,
            )
        scheme, _, token = authorization.strip().partition(" ")
        match = _TOKEN.match(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            raise Unauthenticated(
                "malformed authorization metadata: expected 'Bearer brk_<id>_<secret>'",
                reason=ErrorReason.TOKEN_MALFORMED,
            )
        self._refresh()
        record = self._by_id.get(match.group(1))
        expected = record.sha256 if record is not None else _DUMMY_HASH
        if not hmac.compare_digest(hash_token(token.strip()), expected) or record is None:
            raise Unauthenticated("unknown or revoked token", reason=ErrorReason.TOKEN_INVALID)
        if record.expired(self.clock()):
            raise Unauthenticated(
                f"token {record.id} expired; create a new one", reason=ErrorReason.TOKEN_EXPIRED,
                token_id=record.id,
            )
        return record
