"""The pure rules of the leased placement: when to heartbeat and fence, which
leases may be taken and which taken over, when a round must read every lease,
and when a session's live state is worth writing. No I/O, no clocks: callers
pass `now` (monotonic seconds); the coordinator carries out the answers.

Liveness is per instance, not per session. A lease key names its owner and
fencing token and does not expire; the owner's instance claim (a key renewed
every heartbeat, `broker.cluster.membership`) is the liveness of every lease
it holds. So an idle instance renews one key per tick whatever it owns, and a
lease is taken over, by a compare-and-set in the session's own hash slot, only
once its owner's claim is gone, that is at least one TTL after the owner last
renewed, by which time the owner has fenced itself (`FENCE_AFTER`).

The heartbeat runs on its own thread (`broker.cluster.heartbeat`), so a busy
event loop does not starve it; it renews only while the event loop shows
progress (`Progress`), so a wedged or paused process still loses its claim.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

RENEW_EVERY = 1 / 5
"""Heartbeat (and claim round) period, as a fraction of the lease TTL."""
FENCE_AFTER = 1 / 2
"""An instance whose heartbeat was not confirmed for this fraction of the TTL gives
up every lease locally; no one can take them over before the full TTL."""
FENCE_CHECK_EVERY = 1 / 20
"""How often the fence loop looks, as a fraction of the TTL."""
RESCAN_EVERY_S = 300.0
"""Even when nothing moved, read every lease this often: a safety net only (a
release raises the lease version, a death changes the members)."""
RELOAD_EVERY_S = 300.0
"""Even when the session set's version did not move, reread every session record
this often (a writer may have crashed between its change and the version bump)."""
CLAIM_BATCH = 32
"""Leases a round asks for side by side."""
FULL_READ_EVERY = 10.0
"""A read of every record (or every lease) starts at most once per this many times
its last duration, so its share of the time stays bounded however often things
change (a failover of thousands, a stream of releases)."""
CANDIDATES_AT_ONCE = 4
"""A round reads the leases of at most this many times its room of known-free
candidates (at least CLAIM_BATCH), best-ranked first: those found owned are
dropped, so a long list drains over rounds without a round costing O(list)."""
MIN_ROUND_GAP_S = 0.25
"""The least time between claim rounds: a burst of announcements is one round."""
LOOP_STALL_AFTER = 3 / 4
"""The heartbeat thread stops renewing once the event loop showed no progress for
this fraction of the TTL: a wedged process loses its claim within 1.75 TTL.
Safety does not rest on it (leases stay fresh only as long as renewals are
confirmed, and a stalled loop does no I/O); it only bounds how long a process
that stopped working keeps its sessions from the others."""
LIVE_TTL_S = 3600.0
"""How long a live report stands; owners refresh it at half that while unchanged."""
LIVE_ACTIVITY_EVERY_S = 300.0
"""A change of last activity alone (every keep-alive is one) is written at most this
often per session: Health on another instance shows it to within five minutes."""


def rank(instance_id: str, session_id: str) -> bytes:
    """Rendezvous order: instances try different sessions first, so they rarely race."""
    return hashlib.blake2b(f"{instance_id}/{session_id}".encode(), digest_size=8).digest()


def fair_share(sessions: int, instances: int) -> int:
    return math.ceil(sessions / max(1, instances))


def next_round_in(interval_s: float, heartbeats: Mapping[str, float], *, me: str,
                  ttl_s: float, now: float) -> float:
    """How long the claim loop may wait: its period, or less when another instance's
    claim lapses sooner (its last heartbeat + TTL, wall clock), so its sessions are
    taken over right then rather than up to a period later."""
    lapses = [at + ttl_s - now for instance, at in heartbeats.items() if instance != me]
    soonest = min((t for t in lapses if t >= 0), default=interval_s)
    return max(0.05, min(interval_s, soonest + 0.05))


def holder_of(value: bytes | str | None) -> str | None:
    """The instance named by a lease value "<instance>:<token>"."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text.rsplit(":", 1)[0]


def first_choice(session_id: str, live: Collection[str]) -> str | None:
    """The live instance that tries a newly announced session first, without a full
    read (the others find it at their next one, if it is still free)."""
    return max(live, key=lambda i: rank(i, session_id), default=None)


class Liveness:
    """This instance's heartbeat, which keeps every lease it holds.

    `renewed` takes the time a confirmed heartbeat was *sent*, so neither a slow
    reply nor a long round makes the leases look fresher than Redis knows them.
    Fed from the heartbeat thread and read on the event loop: a lock keeps each
    step whole.
    """

    def __init__(self, ttl_s: float) -> None:
        self.fence_after_s = ttl_s * FENCE_AFTER
        self._sent_at: float | None = None
        self._lock = threading.Lock()

    def renewed(self, sent_at: float) -> None:
        with self._lock:
            self._sent_at = sent_at if self._sent_at is None else max(self._sent_at, sent_at)

    def lost(self) -> None:
        """The claim is gone or another's: nothing held so far is ours any more."""
        with self._lock:
            self._sent_at = None

    def fresh(self, now: float) -> bool:
        """Whether leases may be used (connect, claim) now."""
        sent_at = self._sent_at
        return sent_at is not None and now - sent_at < self.fence_after_s

    def must_fence(self, now: float) -> bool:
        """True once, when the heartbeat went stale: give every lease up now."""
        with self._lock:
            if self._sent_at is None or self.fresh(now):
                return False
            self._sent_at = None
            return True


class Progress:
    """Whether the event loop still makes progress, as the heartbeat thread sees it.

    The loop ticks it every few hundred milliseconds; the heartbeat renews the
    claim only while the last tick is recent, so a loop that is merely busy keeps
    its sessions and one that stopped (wedged, or paused with its threads) loses
    them like a dead process.
    """

    def __init__(self, ttl_s: float) -> None:
        self.stall_after_s = ttl_s * LOOP_STALL_AFTER
        self._at: float | None = None

    def tick(self, now: float) -> None:
        self._at = now

    def may_renew(self, now: float) -> bool:
        at = self._at
        return at is not None and now - at < self.stall_after_s


@dataclass(frozen=True)
class Survey:
    """Every enabled session not owned here, judged by its lease."""

    free: list[str] = field(default_factory=list)
    """No lease: may be acquired."""
    orphaned: dict[str, str] = field(default_factory=dict)
    """Session -> the lease value to compare-and-set: its owner's claim is gone, or
    it names this instance, which does not hold it (a past life of this id)."""
    settled: bool = True
    """Every session is held by a live instance: no need to look again soon."""


def survey(
    leases: Mapping[str, bytes | str | None], *, me: str, claimed: Collection[str],
    live: Collection[str],
) -> Survey:
    """Judge each lease. `claimed`: instances whose claim key exists now; `live`:
    instances in the membership set (a holder must be both to count as settled)."""
    free: list[str] = []
    orphaned: dict[str, str] = {}
    settled = True
    for session_id, raw in leases.items():
        holder = holder_of(raw)
        if holder is None:
            free.append(session_id)
        elif holder == me or holder not in claimed:
            assert raw is not None
            orphaned[session_id] = raw.decode() if isinstance(raw, bytes) else raw
        elif holder not in live:
            settled = False  # claimed but not (or no longer) a member: look again
    if free or orphaned:
        settled = False
    return Survey(free, orphaned, settled)


def claim_order(instance_id: str, found: Survey) -> list[str]:
    """Sessions to try, free and orphaned alike, in this instance's rendezvous order."""
    return sorted([*found.free, *found.orphaned], key=lambda s: rank(instance_id, s))


def shed_victim(instance_id: str, owned: Iterable[str]) -> str:
    return max(owned, key=lambda s: rank(instance_id, s))


class RoundSchedule:
    """When a claim round must reread the session records and every lease.

    Idle, a round reads neither: records when the session set's version moved
    while no announcement was heard for `quiet_s` (an announced session is read
    by id, so a stream of creations costs no full read; a version that moved
    unannounced, a disable or a delete, is read once things are quiet) or every
    RELOAD_EVERY_S; leases after a change of members, of the lease version or a
    lease lost here, until a survey finds everything settled (or every
    RESCAN_EVERY_S). Either full read waits FULL_READ_EVERY times its last
    duration after the previous one started.
    """

    def __init__(self, rescan_every_s: float = RESCAN_EVERY_S,
                 reload_every_s: float = RELOAD_EVERY_S,
                 full_read_every: float = FULL_READ_EVERY, quiet_s: float = 0.0) -> None:
        self._rescan_every_s = rescan_every_s
        self._reload_every_s = reload_every_s
        self._pace = full_read_every
        self._quiet_s = quiet_s
        self._heard_at = -math.inf
        self._load_took_s = 0.0
        self._scan_took_s = 0.0
        self._version: str | None = None
        self._loaded_at: float | None = None
        self._scanned_at: float | None = None
        self._dirty = True
        self._members: tuple[str, ...] = ()
        self._released: str | None = None

    def changed(self) -> None:
        """Something may have moved (an announcement, a release, a lost lease)."""
        self._dirty = True

    def members(self, live: Collection[str]) -> None:
        """The live instances this round; a change means leases may be orphaned or
        the fair share moved."""
        current = tuple(sorted(live))
        if current != self._members:
            self._members = current
            self._dirty = True

    def releases(self, version: str | None) -> None:
        """The lease version this round: a move means a lease was let go."""
        if version != self._released:
            self._released = version
            self._dirty = True

    def heard(self, now: float) -> None:
        """A session was announced by id (it is read on its own)."""
        self._heard_at = now

    def reload_due(self, version: str | None, now: float) -> bool:
        if self._loaded_at is None:
            return True
        since = now - self._loaded_at
        moved = version != self._version and now - self._heard_at >= self._quiet_s
        return (moved or since >= self._reload_every_s) and since >= self._pace * self._load_took_s

    def loaded(self, version: str | None, now: float, took_s: float = 0.0) -> None:
        """A full read of the records started at `now` and took `took_s`."""
        if version != self._version:
            self._dirty = True
        self._version, self._loaded_at, self._load_took_s = version, now, took_s

    def scan_due(self, now: float) -> bool:
        if self._scanned_at is None:
            return True
        since = now - self._scanned_at
        return ((self._dirty or since >= self._rescan_every_s)
                and since >= self._pace * self._scan_took_s)

    def scanned(self, now: float, settled: bool, took_s: float = 0.0) -> None:
        """A survey of every lease started at `now` and took `took_s`."""
        self._scanned_at, self._scan_took_s = now, took_s
        self._dirty = not settled


class Candidates:
    """Sessions that may have no live owner and that this instance has not taken:
    announced ones, and those a survey found free while this instance was at its
    fair share. While it has room, a round reads just their leases, best-ranked
    first, so a session whose first choice is full is taken by another instance
    within a round or two rather than at its next read of every lease.

    An announced session is left to its first choice for `grace_s` (the others
    would only race it for the lease); one a survey found free is due at once.
    """

    def __init__(self, instance_id: str, grace_s: float) -> None:
        self.instance_id = instance_id
        self.grace_s = grace_s
        self._due_at: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._due_at)

    def announced(self, session_id: str, live: Collection[str], now: float) -> None:
        first = first_choice(session_id, live) in (self.instance_id, None)
        self._due_at.setdefault(session_id, now if first else now + self.grace_s)

    def found_free(self, session_ids: Iterable[str], now: float) -> None:
        for session_id in session_ids:
            self._due_at[session_id] = min(self._due_at.get(session_id, now), now)

    def settled(self, session_ids: Iterable[str]) -> None:
        """Owned (here or by a live instance), gone or disabled: not a candidate."""
        for session_id in session_ids:
            self._due_at.pop(session_id, None)

    def keep_only(self, known: Collection[str]) -> None:
        """After a full read of the records: forget sessions no longer enabled."""
        for session_id in [s for s in self._due_at if s not in known]:
            del self._due_at[session_id]

    def due(self, now: float, room: int) -> list[str]:
        """The candidates to look at this round, best-ranked first."""
        if room <= 0:
            return []
        ready = [s for s, at in self._due_at.items() if at <= now]
        ready.sort(key=lambda s: rank(self.instance_id, s))
        return ready[:max(CLAIM_BATCH, room * CANDIDATES_AT_ONCE)]


@dataclass
class _Reported:
    state: str
    activity: float
    at: float


class LiveReports:
    """Which owned sessions' live state is worth writing this round: a new
    state, activity after LIVE_ACTIVITY_EVERY_S, or a refresh at half its TTL."""

    def __init__(self, ttl_s: float = LIVE_TTL_S,
                 activity_every_s: float = LIVE_ACTIVITY_EVERY_S) -> None:
        self.ttl_s = ttl_s
        self._activity_every_s = activity_every_s
        self._last: dict[str, _Reported] = {}

    def due(self, session_id: str, state: str, activity: float, now: float) -> bool:
        last = self._last.get(session_id)
        if last is None or last.state != state:
            return True
        age = now - last.at
        return age >= self.ttl_s / 2 or (activity != last.activity
                                         and age >= self._activity_every_s)

    def reported(self, session_id: str, state: str, activity: float, now: float) -> None:
        self._last[session_id] = _Reported(state, activity, now)

    def forget(self, session_id: str) -> None:
        self._last.pop(session_id, None)
