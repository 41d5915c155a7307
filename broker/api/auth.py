"""Authentication and per-tenant authorisation: one grpc.aio server interceptor.

The interceptor wraps each method handler, so it sees the decoded request and
can resolve the tenant of the session it names; the servicer stays unaware of
callers. Rules:

- ``grpc.health.v1.Health`` stays open (load-balancer and Kubernetes probes).
- Server reflection needs any valid token.
- ``broker.v1.Broker``: the role must grant the method's permission
  (worker: Send/SendStream/SendBatch/SendPresence/Receive/AckInbound/ReceiveUpdates/
  AckUpdates/GetMessage/DownloadMedia; viewer: StreamStatus/Health/GetSession/ListSessions/
  GetQr;
  admin: all), then every session or tenant the request names must be in the
  token's tenants. A session unknown to a tenant-scoped token is refused like
  another tenant's session, so tokens cannot probe for other tenants' session ids.
- StreamStatus, Health and ListSessions without session ids or a tenant are
  *filtered* to the token's tenants (not refused), so one dashboard query works
  for any token.
- Methods not listed here (added later) need an admin token for all tenants.

Failures are BrokerErrors mapped by broker.api.status, so clients get the
usual ErrorInfo reasons: TOKEN_MISSING, TOKEN_MALFORMED, TOKEN_INVALID,
TOKEN_EXPIRED (UNAUTHENTICATED); WRONG_ROLE, WRONG_TENANT (PERMISSION_DENIED).
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf.message import Message

from broker import validation
from broker.api.status import ServerInterceptor, to_status
from broker.auth.tokens import Permission, TokenRecord, TokenStore
from broker.errors import BrokerError, ErrorReason, PermissionDenied, Unauthenticated
from broker.store.base import Store
from broker_client.v1 import broker_pb2 as pb

if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]

log = logging.getLogger(__name__)

TenantOf = Callable[[str], Awaitable[str | None]]
"""The tenant owning a session id, or None when there is no such session."""

ItemGuard = Callable[[str], Awaitable[None]]
item_guard: ContextVar[ItemGuard | None] = ContextVar("item_guard", default=None)
"""Set for a SendStream/SendBatch call by a token limited to some tenants: the check
of one item's session (raises PermissionDenied), so a foreign item fails alone, with
the error a unary Send of it would get, and the call goes on."""

BROKER_PREFIX = "/broker.v1.Broker/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_PREFIXES = ("/grpc.reflection.",)

_SESSION, _SESSIONS, _LISTING, _CREATE = "session", "sessions", "listing", "create"
_ITEMS = "items"
"""Many-Sends calls: each item's session is checked as the item is read (item_guard)."""
RULES: dict[str, tuple[Permission, str]] = {
    "Send": (Permission.SEND, _SESSION),
    "SendStream": (Permission.SEND, _ITEMS),
    "SendBatch": (Permission.SEND, _ITEMS),
    "AckInbound": (Permission.SEND, _SESSION),
    "SendPresence": (Permission.SEND, _SESSION),
    "Receive": (Permission.SEND, _SESSIONS),
    "ReceiveUpdates": (Permission.SEND, _SESSIONS),
    "AckUpdates": (Permission.SEND, _SESSION),
    "GetMessage": (Permission.SEND, _SESSION),
    "DownloadMedia": (Permission.SEND, _SESSION),
    "StreamStatus": (Permission.VIEW, _LISTING),
    "Health": (Permission.VIEW, _LISTING),
    "ListSessions": (Permission.VIEW, _LISTING),
    "GetSession": (Permission.VIEW, _SESSION),
    "GetQr": (Permission.VIEW, _SESSION),
    "CreateSession": (Permission.MANAGE, _CREATE),
    "StopSession": (Permission.MANAGE, _SESSION),
    "LogoutSession": (Permission.MANAGE, _SESSION),
    "RestartSession": (Permission.MANAGE, _SESSION),
    "DeleteSession": (Permission.MANAGE, _SESSION),
    "RequestPairingCode": (Permission.MANAGE, _SESSION),
}


def store_tenants(store: Store) -> TenantOf:
    async def tenant_of(session_id: str) -> str | None:
        record = await store.get_session(session_id)
        return record.tenant if record is not None else None

    return tenant_of


class Authorizer:
    """Decides one call: who is calling (token) and whether it may do this."""

    def __init__(self, tokens: TokenStore, tenant_of: TenantOf) -> None:
        self.tokens = tokens
        self.tenant_of = tenant_of

    def authenticate(self, metadata: Any) -> TokenRecord:
        values = [v for k, v in metadata or () if k == "authorization"]
        if len(values) > 1:
            raise Unauthenticated("send exactly one authorization header",
                                  reason=ErrorReason.TOKEN_MALFORMED)
        value = values[0] if values else None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return self.tokens.authenticate(value)

    async def authorize(self, method: str, request: Any, token: TokenRecord) -> bool:
        """Raise PermissionDenied, or return True when the answer must be filtered by tenant."""
        name = method.removeprefix(BROKER_PREFIX)
        permission, scope = RULES.get(name, (Permission.MANAGE, ""))
        if not token.may(permission):
            raise PermissionDenied(
                f"a {token.role.value} token may not call {name}", reason=ErrorReason.WRONG_ROLE,
                token_id=token.id, role=token.role.value, method=name,
            )
        if scope == _ITEMS:
            if not token.all_tenants:
                item_guard.set(functools.partial(self._session, token))
            return False
        decoded = isinstance(request, Message)  # (a separate name keeps `request` Any)
        if token.all_tenants or not decoded:
            return False  # undecodable bytes: the handler answers INVALID_ARGUMENT
        if scope == _SESSION:
            await self._session(token, request.session_id)
        elif scope == _SESSIONS:
            for sid in request.session_ids:
                await self._session(token, sid)
        elif scope == _CREATE:
            self._tenant(token, validation.tenant(request.tenant))
        elif scope == _LISTING:
            ids = list(getattr(request, "session_ids", ()))
            for sid in ids:
                await self._session(token, sid)
            if request.tenant:
                self._tenant(token, validation.session_id(request.tenant, "tenant"))
            return not ids and not request.tenant
        else:
            raise PermissionDenied(f"{name} needs an admin token for all tenants",
                                   reason=ErrorReason.WRONG_TENANT, token_id=token.id, method=name)
        return False

    async def _session(self, token: TokenRecord, session_id: str) -> None:
        validation.session_id(session_id)
        tenant = await self.tenant_of(session_id)
        if tenant is None or not token.allows_tenant(tenant):
            raise PermissionDenied(
                f"this token may not act for session {session_id!r}",
                reason=ErrorReason.WRONG_TENANT, session_id=session_id, token_id=token.id,
            )

    @staticmethod
    def _tenant(token: TokenRecord, tenant: str) -> None:
        if not token.allows_tenant(tenant):
            raise PermissionDenied(
                f"this token may not act for tenant {tenant!r}", reason=ErrorReason.WRONG_TENANT,
                tenant=tenant, token_id=token.id,
            )


def _restrict(token: TokenRecord, response: Any) -> Any:
    """The part of a listing answer the token may see."""
    if isinstance(response, pb.ListSessionsResponse):
        return pb.ListSessionsResponse(
            sessions=[s for s in response.sessions if token.allows_tenant(s.tenant)]
        )
    if isinstance(response, pb.HealthResponse):
        return pb.HealthResponse(
            sessions=[h for h in response.sessions if token.allows_tenant(h.session.tenant)]
        )
    if isinstance(response, pb.StatusEvent):
        return response if token.allows_tenant(response.tenant) else None
    raise TypeError(f"cannot filter {type(response).__name__} by tenant")  # pragma: no cover


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: BrokerError) -> None:
    await cast(Any, context).abort_with_status(to_status(error))


async def _results(outcome: Any) -> AsyncIterator[Any]:
    """Items of a streaming handler, whether an async generator or a coroutine writing itself."""
    if inspect.isawaitable(outcome):
        await outcome
        return
    async for item in outcome:
        yield item


class AuthInterceptor(ServerInterceptor):
    """Checks every call before its handler runs; see the module docstring for the rules."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        return self._wrap(method, handler)

    async def _check(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> TokenRecord | None:
        """The token when answers must be filtered to its tenants, else None; aborts on denial."""
        token: TokenRecord | None = None
        try:
            token = self.authorizer.authenticate(context.invocation_metadata())
            if not method.startswith(BROKER_PREFIX):
                return None  # reflection: any valid token
            return token if await self.authorizer.authorize(method, request, token) else None
        except BrokerError as exc:
            level = logging.WARNING if isinstance(exc, PermissionDenied) else logging.INFO
            log.log(level, "denied %s: %s %s (token %s)", method, exc.code.name, exc.reason,
                    token.id if token else "-")
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc  # abort_with_status always raises

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        options = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            inner_uu = cast(Callable[..., Any], handler.unary_unary)

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                scoped = await self._check(method, request, context)
                response = inner_uu(request, context)
                if inspect.isawaitable(response):
                    response = await response
                return _restrict(scoped, response) if scoped is not None else response

            return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
        if handler.unary_stream is not None:
            inner_us = cast(Callable[..., Any], handler.unary_stream)

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                scoped = await self._check(method, request, context)
                async for item in _results(inner_us(request, context)):
                    if scoped is None or _restrict(scoped, item) is not None:
                        yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
        if handler.stream_stream is not None:
            inner_ss = cast(Callable[..., Any], handler.stream_stream)

            async def stream_stream(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await self._check(method, None, context)
                async for item in _results(inner_ss(requests, context)):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, **options)
        inner_su = cast(Callable[..., Any], handler.stream_unary)

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._check(method, None, context)
            response = inner_su(requests, context)
            return await response if inspect.isawaitable(response) else response

        return grpc.stream_unary_rpc_method_handler(stream_unary, **options)


def is_loopback(listen: str) -> bool:
    """Whether a listen address can only be reached from this machine."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
    )


def check_exposure(listen: str, auth_on: bool) -> None:
    """Refuse to serve without authentication anywhere but the loopback interface."""
    if auth_on:
        return
    if not is_loopback(listen):
        raise ValueError(
            f"refusing to listen on {listen} without authentication: anyone who can reach it "
            "could send as every session. Create tokens (`broker token create --role admin "
            "--tenant '*' --file tokens.json`) and pass --auth-tokens tokens.json, or listen "
            "on a loopback address such as 127.0.0.1"
        )
    log.warning("authentication is OFF (loopback only)")
