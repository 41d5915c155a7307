"""The Redis key layout, defined once: the store, the leases, membership, the
coordinator and the rate limiter all name their keys here.

``P`` is the key prefix (default ``broker``); ``T`` is ``{s:<session_id>}``, the
hash tag shared by every key of one session, so one Lua script can touch them
together and the layout holds on Redis Cluster.

- ``P:T:session``       hash: tenant, enabled, created_at
- ``P:T:creds``         string: AES-GCM sealed credentials (see `broker.store.crypto`)
- ``P:T:kv``            hash: the session's key-value area, name -> value sealed on its
                        own (`CredentialCipher.seal_value`; see `broker.store.kv`)
- ``P:T:outbox``        stream: unacked messages in FIFO order (acked ones are XDEL'd),
                        read by the owner through the ``owners`` consumer group
- ``P:T:ids``           hash: message id -> outbox stream entry id (unacked only)
- ``P:T:seq``           counter: the outbox sequence
- ``P:T:idem:<key>``    string: the message accepted under an idempotency key;
                        no TTL while unacked, the idempotency TTL once acked; none for
                        a Send without a key (nobody can retry with a key they lack)
- ``P:T:result:<mid>``  string: ack time of a delivered message (idempotency TTL)
- ``P:T:result:<mid>:key`` string: its idempotency key (idempotency TTL), so the
                        message stays readable by id after its ack (`sent_message`)
- ``P:T:result:<mid>:sent`` string: a message sent without an idempotency key, as
                        its record (idempotency TTL, from its ack): the same purpose,
                        as such a message has no ``idem`` record
- ``P:T:last``          hash: the session's last status event (``id``, ``event``; with the
                        sharded log also ``seq``, and ``id`` '' until the entry is named)
- ``P:T:fence``         string: the current fencing token (see `broker.store.redis.scripts`);
                        kept, and raised, when the session is deleted
- ``P:T:lease``         string: "<instance>:<token>" of the owning instance, no TTL: it
                        lives as long as that instance's claim (broker.cluster.rules);
                        ``P:leases:version`` counter raised after every release
- ``P:T:live``          hash: the owner's live report, written on change, refreshed
                        within its TTL (an hour) while unchanged
- ``P:T:acked``         pub/sub channel: "<mid> <acked_at>" on every ack
- ``P:T:inbound``       stream: inbound messages; consumer groups are the worker groups
- ``P:T:inbound:seen``  hash: upstream message id -> inbound stream entry id (de-dup)
- ``P:T:inbound:aged``  sorted set: upstream message id by arrival (ms), to trim
                        the de-dup hash with the stream past the inbound retention
- ``P:T:updates``, ``P:T:updates:seen``, ``P:T:updates:aged``  the same for the
                        status updates of sent messages (topic UPDATES)
- ``P:T:rate``          hash: the session's send token bucket (broker.runtime.ratelimit)
- ``P:sessions``        set of all session ids; ``P:tenant:<tenant>`` one per tenant;
                        ``P:sessions:version`` counter raised after every change of the
                        session set or an enabled flag (coordinators reload on a move)
                        Sharded (Redis Cluster): ``P:{x:<i>}:sessions``, shard `i`
                        = `shard_of(session_id, shards)`, each shard in its own slot
- ``P:events``          stream: the global status event log, ``MAXLEN ~ event_log_size``;
                        its entry ids are the event ids. Sharded (Redis Cluster):
                        ``P:{e:<i>}:events``, the log of the sessions of shard `i`
- ``P:instances``       sorted set: live broker instances by heartbeat;
                        ``P:instances:id:<id>`` the claim on one instance id, renewed
                        every heartbeat: the liveness of every lease the instance holds;
                        ``P:instances:inbox:<id>`` stream: requests for that instance's
                        sessions (kick, stop, ...), read by it alone
- ``P:control``         pub/sub channel: coordinator messages (rebalance, ...)
- ``P:ack-listener``    pub/sub channel the ack listener always subscribes to
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def shard_of(session_id: str, shards: int) -> int:
    """The shard of a session's entries in sharded shared structures (stable: CRC-32)."""
    return zlib.crc32(session_id.encode()) % shards if shards > 1 else 0


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "broker"

    # per session: every name starts with the session's hash tag
    def session_tag(self, session_id: str) -> str:
        """The prefix and hash tag every key of this session starts with."""
        return f"{self.prefix}:{{s:{session_id}}}"

    def _part(self, session_id: str, part: str) -> str:
        return f"{self.session_tag(session_id)}:{part}"

    def session_pattern(self, session_id: str) -> str:
        """A SCAN MATCH pattern for every key of the session (its id glob-escaped)."""
        return _glob_escape(self.session_tag(session_id)) + ":*"

    def session(self, session_id: str) -> str:
        return self._part(session_id, "session")

    def creds(self, session_id: str) -> str:
        return self._part(session_id, "creds")

    def kv(self, session_id: str) -> str:
        return self._part(session_id, "kv")

    def outbox(self, session_id: str) -> str:
        return self._part(session_id, "outbox")

    def ids(self, session_id: str) -> str:
        return self._part(session_id, "ids")

    def seq(self, session_id: str) -> str:
        return self._part(session_id, "seq")

    def idem(self, session_id: str, idempotency_key: str = "") -> str:
        """With no key: the prefix the outbox script appends keys to."""
        return self._part(session_id, f"idem:{idempotency_key}")

    def result(self, session_id: str, message_id: str = "") -> str:
        """With no message id: the prefix the outbox script appends ids to."""
        return self._part(session_id, f"result:{message_id}")

    def result_key(self, session_id: str, message_id: str) -> str:
        """The idempotency key of an acked message (to find its record)."""
        return self._part(session_id, f"result:{message_id}:key")

    def result_content(self, session_id: str, message_id: str) -> str:
        """An acked message's content beyond text, for the sent-message retention."""
        return self._part(session_id, f"result:{message_id}:content")

    def sent(self, session_id: str, message_id: str) -> str:
        """An acked message sent without an idempotency key, as its record."""
        return self._part(session_id, f"result:{message_id}:sent")

    def last(self, session_id: str) -> str:
        return self._part(session_id, "last")

    def fence(self, session_id: str) -> str:
        """The session's current fencing token; only grows, survives delete."""
        return self._part(session_id, "fence")

    def lease(self, session_id: str) -> str:
        """"<instance>:<token>" while an instance owns the session."""
        return self._part(session_id, "lease")

    def live(self, session_id: str) -> str:
        return self._part(session_id, "live")

    def acked(self, session_id: str) -> str:
        """The pub/sub channel an ack is announced on."""
        return self._part(session_id, "acked")

    def inbound(self, session_id: str, topic: str = "inbound") -> str:
        """A topic's stream ("inbound", "updates")."""
        return self._part(session_id, topic)

    def inbound_seen(self, session_id: str, topic: str = "inbound") -> str:
        return self._part(session_id, f"{topic}:seen")

    def inbound_aged(self, session_id: str, topic: str = "inbound") -> str:
        return self._part(session_id, f"{topic}:aged")

    def inbound_media(self, session_id: str, topic: str = "inbound") -> str:
        """Upstream id -> the bytes of the medium that came with that entry."""
        return self._part(session_id, f"{topic}:media")

    def rate(self, session_id: str) -> str:
        """The send token bucket; under the tag, so deleting the session removes it."""
        return self._part(session_id, "rate")

    # shared by every session
    @property
    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    @property
    def sessions_version(self) -> str:
        """Raised after every change of the session set or of an enabled flag."""
        return f"{self.prefix}:sessions:version"

    @property
    def leases_version(self) -> str:
        """Raised after every lease release: a session may be free to claim."""
        return f"{self.prefix}:leases:version"

    def tenant(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    def event_shard(self, shard: int) -> str:
        """One shard of the sharded event log, under its own hash tag (its own slot)."""
        return f"{self.prefix}:{{e:{shard}}}:events"

    def sessions_shard(self, shard: int) -> str:
        """One shard of the sharded session index, under its own hash tag."""
        return f"{self.prefix}:{{x:{shard}}}:sessions"

    @property
    def instances(self) -> str:
        return f"{self.prefix}:instances"

    def instance_claim(self, instance_id: str) -> str:
        """Held by the one live process running under this instance id."""
        return f"{self.instances}:id:{instance_id}"

    def instance_inbox(self, instance_id: str) -> str:
        """The stream other instances put requests for this instance's sessions in."""
        return f"{self.instances}:inbox:{instance_id}"

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"

    @property
    def ack_listener(self) -> str:
        return f"{self.prefix}:ack-listener"
