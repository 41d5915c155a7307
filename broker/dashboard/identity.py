"""Who a dashboard request acts as: the signed-in tab's token, passed through.

The dashboard holds no authority of its own. A tab signs in with one of the
broker's own tokens (kept only in the tab's memory), sends it on every request
(``Authorization: Bearer ...``) and as the first websocket message, and each
gRPC call made for that request carries it, so the broker's own authorization
decides every call. A request without a token calls with the dashboard's own
identity: none for the embedded dashboard (fine with auth off; refused with
auth on, so the page asks to sign in), the ``--token`` of ``broker dashboard``
for the standalone one. Requests that change something must come from the
dashboard's own origin (or from no browser at all), so another site cannot
act through a visitor's browser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
from aiohttp import web

from broker_client import BrokerClient, BrokerError

#: What a bearer token may look like before it goes into gRPC metadata (which
#: takes printable ASCII only); the broker judges everything else.
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")


class BadToken(ValueError):
    """The Authorization header is not a bearer token at all (HTTP 401)."""


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent."""
    if header is None or not header.strip():
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
        raise BadToken("send the token as 'Authorization: Bearer <token>'")
    return token


def check_token(token: object) -> str | None:
    """A token sent in a websocket's first message, checked like a header's."""
    if token is None or token == "":
        return None
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise BadToken("the token must be a string of printable characters")
    return token


def same_origin(request: web.BaseRequest) -> bool:
    """No Origin (not a browser) or the Origin names this very host."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("Host")


class Clients:
    """One gRPC channel to the broker; a client per request's token on it."""

    def __init__(self, base: BrokerClient) -> None:
        self.base = base

    def acting_as(self, token: str | None) -> BrokerClient:
        return self.base.with_token(token)


@dataclass(frozen=True)
class Access:
    """What the broker lets a token do, as the page shows it."""

    can_view: bool
    can_manage: bool


async def probe(client: BrokerClient) -> Access:
    """Ask the broker what this caller may do, without changing anything.

    Viewing: ListSessions answers (a refusal raises, for the page to show).
    Managing: RestartSession of an empty id - refused for the role first
    (PERMISSION_DENIED, WRONG_ROLE), or else refused as an invalid argument,
    so it never restarts anything.
    """
    await client.list_sessions()
    try:
        await client.restart_session("")
    except BrokerError as exc:
        if exc.code == grpc.StatusCode.PERMISSION_DENIED and exc.reason == "WRONG_ROLE":
            return Access(can_view=True, can_manage=False)
        if exc.code == grpc.StatusCode.UNAUTHENTICATED:
            raise
    return Access(can_view=True, can_manage=True)
