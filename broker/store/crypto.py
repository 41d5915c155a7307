"""Encryption at rest for upstream credentials (AES-256-GCM, rotatable keys).

Credentials are the keys to a person's messaging account, so the Redis store
never holds them in clear. Every value names the key that sealed it, so keys
can rotate: new writes use the current key while older ones still decrypt.
The session id is associated data, so a value copied onto another session
fails to decrypt instead of handing one session another's account.

Keys come from ``BROKER_CREDENTIAL_KEYS="kid1:<base64 key>,kid2:<base64 key>"``
(the first is current) or from a file named by ``BROKER_CREDENTIAL_KEY_FILE``
holding the same text. ``python -m broker.store.crypto`` prints a new key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

KEYS_ENV = "BROKER_CREDENTIAL_KEYS"
KEY_FILE_ENV = "BROKER_CREDENTIAL_KEY_FILE"

_MAGIC = b"bc1"
"""Format tag of a sealed value: ``bc1.<key id>.<base64url(nonce || ciphertext)>``."""
_NONCE_BYTES = 12
_KID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

HOW_TO_SET_KEY = (
    f"set {KEYS_ENV}='k1:<base64 32-byte key>' (several as 'new:<key>,old:<key>', the first "
    f"is used for new writes) or {KEY_FILE_ENV}=/path/to/file with the same text; create a key "
    "with `python -m broker.store.crypto`"
)


class CredentialKeyError(ValueError):
    """The credential keys are missing or malformed (a configuration error)."""


class CredentialDecryptError(Exception):
    """A stored credential value cannot be opened: unknown key id, wrong key, tampering,
    or a value copied from another session. The message never includes the value.

    `key_id` is the key id the value names ('' when it names none): what an
    operator must configure again. Retrying cannot help, so the session fails."""

    def __init__(self, message: str, *, key_id: str = "") -> None:
        super().__init__(message)
        self.key_id = key_id


def generate_key() -> str:
    """A new random AES-256 key, base64 encoded, ready for BROKER_CREDENTIAL_KEYS."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def key_id_for(key: bytes) -> str:
    """A stable id for a bare key: the same key always gets the same id across restarts."""
    return "k" + hashlib.sha256(b"broker-credential-key-id\0" + key).hexdigest()[:12]


def _check_key(kid: str, key: bytes) -> None:
    if not _KID.match(kid):
        raise CredentialKeyError(
            f"credential key id {kid!r} must be 1-64 characters of A-Z a-z 0-9 _ -"
        )
    if len(key) not in (16, 24, 32):
        raise CredentialKeyError(
            f"credential key {kid!r} is {len(key)} bytes; AES-GCM needs 16, 24 or 32 "
            "(32 recommended)"
        )


def parse_keys(text: str, source: str) -> tuple[dict[str, bytes], str]:
    """Parse ``kid:base64key[,kid:base64key...]``; returns (keys, current key id)."""
    keys: dict[str, bytes] = {}
    current = ""
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        kid, sep, encoded = part.partition(":")
        if not sep:
            raise CredentialKeyError(f"{source}: each entry must be 'kid:base64key'")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise CredentialKeyError(
                f"{source}: the key of {kid!r} is not valid base64"
            ) from None
        _check_key(kid, key)
        if kid in keys:
            raise CredentialKeyError(f"{source}: key id {kid!r} appears twice")
        keys[kid] = key
        current = current or kid
    if not keys:
        raise CredentialKeyError(f"{source} holds no keys; {HOW_TO_SET_KEY}")
    return keys, current


class CredentialCipher:
    """Seals and opens credential dicts; holds keys by id, writes with the current one."""

    __slots__ = ("_aeads", "_current")

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise CredentialKeyError(f"current credential key id {current!r} is not among the keys")
        for kid, key in keys.items():
            _check_key(kid, key)
        self._aeads = {kid: AESGCM(key) for kid, key in keys.items()}
        self._current = current

    @classmethod
    def from_key(cls, key: bytes) -> CredentialCipher:
        """One bare key; its id is derived from it so it is stable across restarts."""
        kid = key_id_for(key)
        return cls({kid: key}, kid)

    @classmethod
    def ephemeral(cls) -> CredentialCipher:
        """A random key that lives only in this process: stored credentials die with it."""
        return cls({"ephemeral": AESGCM.generate_key(bit_length=256)}, "ephemeral")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CredentialCipher | None:
        """Keys from BROKER_CREDENTIAL_KEYS or ..._KEY_FILE; None if neither is set."""
        env = os.environ if environ is None else environ
        text = env.get(KEYS_ENV, "").strip()
        if text:
            return cls(*parse_keys(text, KEYS_ENV))
        path = env.get(KEY_FILE_ENV, "").strip()
        if path:
            try:
                content = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise CredentialKeyError(
                    f"{KEY_FILE_ENV}={path!r} cannot be read: {exc.strerror}"
                ) from None
            return cls(*parse_keys(content, f"{KEY_FILE_ENV} ({path})"))
        return None

    @property
    def current_key_id(self) -> str:
        return self._current

    @property
    def key_ids(self) -> list[str]:
        return list(self._aeads)

    def __repr__(self) -> str:
        return f"CredentialCipher(key_ids={self.key_ids!r}, current={self._current!r})"

    @staticmethod
    def _aad(session_id: str, kid: str) -> bytes:
        return b"broker-credentials\0" + session_id.encode() + b"\0" + kid.encode()

    @staticmethod
    def key_id_of(sealed: bytes) -> str:
        """The key id a sealed value names (not secret: lets operators see what to rotate)."""
        magic, _, rest = sealed.partition(b".")
        kid, sep, _ = rest.partition(b".")
        if magic != _MAGIC or not sep:
            raise CredentialDecryptError("stored credentials are not in a known format")
        return kid.decode("ascii", "replace")

    def encrypt(self, session_id: str, credentials: Mapping[str, Any]) -> bytes:
        """Seal with the current key and a fresh random 96-bit nonce."""
        plain = json.dumps(dict(credentials), separators=(",", ":"), sort_keys=True).encode()
        nonce = secrets.token_bytes(_NONCE_BYTES)
        kid = self._current
        sealed = self._aeads[kid].encrypt(nonce, plain, self._aad(session_id, kid))
        return b".".join((_MAGIC, kid.encode(), base64.urlsafe_b64encode(nonce + sealed)))

    def decrypt(self, session_id: str, sealed: bytes) -> dict[str, Any]:
        kid = self.key_id_of(sealed)
        aead = self._aeads.get(kid)
        if aead is None:
            raise CredentialDecryptError(
                f"credentials of session {session_id!r} were sealed with key id {kid!r}, which "
                f"is not configured (known: {', '.join(self._aeads)}); keep old keys in "
                f"{KEYS_ENV} until every value is rewritten", key_id=kid,
            )
        try:
            raw = base64.urlsafe_b64decode(sealed.split(b".", 2)[2])
            plain = aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._aad(session_id, kid))
        except (InvalidTag, ValueError, binascii.Error):
            raise CredentialDecryptError(
                f"credentials of session {session_id!r} do not decrypt with key {kid!r}: wrong "
                "key, tampered value, or a value copied from another session", key_id=kid,
            ) from None
        value = json.loads(plain)
        if not isinstance(value, dict):
            raise CredentialDecryptError(f"credentials of session {session_id!r} are not a map",
                                         key_id=kid)
        return value


def resolve_cipher(
    cipher: CredentialCipher | None, credential_key: bytes | None, ephemeral_key: bool
) -> CredentialCipher:
    """The Redis store's cipher: explicit cipher, else the given key, else the
    environment, else an ephemeral key only if asked for: credentials are never
    stored in clear."""
    if cipher is not None:
        return cipher
    if credential_key is not None:
        return CredentialCipher.from_key(credential_key)
    from_env = CredentialCipher.from_env()
    if from_env is not None:
        return from_env
    if ephemeral_key:
        log.warning("credentials are encrypted with an ephemeral key: they will not "
                    "decrypt after this process exits")
        return CredentialCipher.ephemeral()
    raise CredentialKeyError(
        f"the Redis store needs a key to encrypt session credentials at rest: {HOW_TO_SET_KEY}"
    )

if __name__ == "__main__":
    print(f"{KEYS_ENV}=k1:{generate_key()}")
