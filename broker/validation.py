"""Input rules shared by every entry point (gRPC, CLI), raising InvalidArgument."""

from __future__ import annotations

import re

from broker.errors import InvalidArgument

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
MAX_RECIPIENT = 256
MAX_KEY = 128
DEFAULT_TENANT = "default"


def session_id(value: str, field: str = "session_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not _ID.fullmatch(value):  # match() would let "id\n" through ($ matches before \n)
        raise InvalidArgument(
            field, "must be 1-128 characters of A-Z a-z 0-9 . _ : - starting alphanumeric"
        )
    return value


def tenant(value: str, field: str = "tenant") -> str:
    return session_id(value, field) if value else DEFAULT_TENANT


def optional_tenant(value: str) -> str | None:
    return session_id(value, "tenant") if value else None


def recipient(value: str) -> str:
    if not value or not value.strip():
        raise InvalidArgument("to", "is required")
    if len(value) > MAX_RECIPIENT:
        raise InvalidArgument("to", f"must be at most {MAX_RECIPIENT} characters")
    return value


def body(value: str, max_bytes: int) -> str:
    if not value:
        raise InvalidArgument("body", "must not be empty")
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise InvalidArgument("body", f"is {size} bytes; the limit is {max_bytes}")
    return value


def idempotency_key(value: str) -> str:
    if len(value) > MAX_KEY or not value.isprintable():
        raise InvalidArgument(
            "idempotency_key", f"must be at most {MAX_KEY} printable characters"
        )
    return value


def phone_number(value: str, field: str = "phone_number") -> str:
    """E.164: '+', then 8-15 digits, the first not 0 (spaces and dashes are dropped)."""
    if not value:
        raise InvalidArgument(field, "is required")
    compact = re.sub(r"[ \-()]", "", value)
    if not _E164.fullmatch(compact):
        raise InvalidArgument(
            field, "must be an E.164 number: '+', the country code and the number, 8-15 "
                   "digits, e.g. +4915123456789"
        )
    return compact
