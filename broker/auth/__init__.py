"""Bearer-token authentication and per-tenant authorisation (see broker.api.auth)."""

from broker.auth.tokens import (
    ALL_TENANTS,
    Permission,
    Role,
    TokenFileError,
    TokenRecord,
    TokenStore,
    new_token,
    parse_ttl,
)

__all__ = [
    "ALL_TENANTS",
    "Permission",
    "Role",
    "TokenFileError",
    "TokenRecord",
    "TokenStore",
    "new_token",
    "parse_ttl",
]
