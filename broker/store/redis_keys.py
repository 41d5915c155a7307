"""The Redis key layout, defined once for the store, the leases and the rate limiter.

Every key of one session starts with ``P:{s:<session_id>}`` (``P`` the key
prefix): the braces are a hash tag, so one Lua script can touch all of a
session's keys together and the layout holds on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "broker"

    def session_tag(self, session_id: str) -> str:
        """The prefix and hash tag every key of this session starts with."""
        return f"{self.prefix}:{{s:{session_id}}}"

    def session(self, session_id: str, part: str) -> str:
        return f"{self.session_tag(session_id)}:{part}"

    def lease(self, session_id: str) -> str:
        """"<instance>:<token>" while an instance owns the session."""
        return self.session(session_id, "lease")

    def fence(self, session_id: str) -> str:
        """The session's current fencing token; only grows, survives delete."""
        return self.session(session_id, "fence")

    @property
    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    def tenant(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def instances(self) -> str:
        return f"{self.prefix}:instances"

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"
