"""`broker token ...`: create, list and revoke API tokens in a token file.

The token is printed once, on stdout, so it can be captured
(``TOKEN=$(broker token create ...)``); everything else goes to stderr.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import click

from broker import validation
from broker.auth.tokens import (
    ALL_TENANTS,
    Role,
    TokenFileError,
    append_record,
    new_token,
    parse_ttl,
    read_records,
    write_records,
)
from broker.errors import InvalidArgument

file_option = click.option(
    "--file", "path", envvar="BROKER_AUTH_TOKENS", required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Token file (the one `broker serve --auth-tokens` reads).",
)


@click.group()
def token() -> None:
    """Manage API tokens (worker / viewer / admin, scoped to tenants)."""


@token.command()
@click.option("--role", required=True, type=click.Choice([r.value for r in Role]),
              help="worker: send/receive; viewer: status and health; admin: everything.")
@click.option("--tenant", "tenants", multiple=True, required=True,
              help="Tenant the token may act for (repeatable; '*' for all).")
@click.option("--ttl", default=None, help="Lifetime, e.g. 30d, 12h (default: no expiry).")
@click.option("--name", default="", help="A label for people (who or what uses it).")
@file_option
def create(role: str, tenants: tuple[str, ...], ttl: str | None, name: str, path: Path) -> None:
    """Create a token, print it once, and store only its hash."""
    try:
        for tenant in tenants:
            if tenant != ALL_TENANTS:
                validation.session_id(tenant, "tenant")
        ttl_s = parse_ttl(ttl) if ttl else None
        secret, record = new_token(Role(role), tenants, name=name, ttl_s=ttl_s)
        append_record(path, record)
    except (InvalidArgument, TokenFileError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    expiry = _when(record.expires_at) if record.expires_at else "never"
    click.echo(f"token {record.id} ({record.role.value} for {', '.join(record.tenants)}; "
               f"expires {expiry}) added to {path}; it is shown only now:", err=True)
    click.echo(secret)


@token.command(name="list")
@file_option
def list_(path: Path) -> None:
    """List tokens (ids, roles, tenants, expiry; never the tokens)."""
    try:
        records = read_records(path)
    except TokenFileError as exc:
        raise click.ClickException(str(exc)) from exc
    now = time.time()
    for r in records:
        expiry = "never" if r.expires_at is None else _when(r.expires_at)
        flag = "  EXPIRED" if r.expired(now) else ""
        click.echo(f"{r.id}  {r.role.value:<6}  {','.join(r.tenants):<20}  expires {expiry}"
                   f"  {r.name}{flag}")


@token.command()
@click.argument("token_id")
@file_option
def revoke(token_id: str, path: Path) -> None:
    """Remove a token; a running broker stops accepting it within a second or so."""
    try:
        records = read_records(path)
        kept = [r for r in records if r.id != token_id]
        if len(kept) == len(records):
            raise click.ClickException(f"no token {token_id!r} in {path}")
        write_records(path, kept)
    except TokenFileError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"token {token_id} revoked", err=True)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")
