"""The session lifecycle state machine: events in, actions out.

Sans-I/O in the style of h11: `SessionMachine.handle` never blocks, sleeps,
reads the clock or touches a socket. The session actor feeds it events, with
the time they happened (`now`), and executes the returned actions in order.
Every decision about reconnecting lives here, so it is tested event by event
without an event loop. So do the handshake's deadlines (the HANDSHAKE timer,
armed on `LinkUp` and re-armed by each QR) and the QR on show.

Two policies decide when the next connection attempt goes, composed in that
order: `ReconnectDelay` by how the last connection ended (a drop after it
opened is redialled promptly, a failure to connect escalates), then the
`AttemptBudget`, which spaces out attempts past its bound whatever their cause.

Conventions the actor can rely on:

- Every state change returns exactly one `Emit`, always the last action. Three
  events emit without changing state: a new QR code (PAIRING -> PAIRING), the
  515 restart after credentials arrived while still CONNECTING (CONNECTING ->
  CONNECTING: it is a new connection), and a `Start` while RECONNECTING that
  the attempt budget holds back (RECONNECTING -> RECONNECTING, a new delay).
- Timers are cancelled only if armed; a `TimerFired` for a timer the machine
  did not arm (or already cancelled) is ignored, so cancel races are harmless.
- Events that make no sense in the current state return `[]`; nothing raises.
"""

from __future__ import annotations

import random

from broker.lifecycle.actions import (
    Action,
    CancelTimer,
    ClearCredentials,
    ClearKeys,
    CloseConnection,
    Emit,
    OpenConnection,
    SaveCredentials,
    SendLogout,
    SendPing,
    StartTimer,
    Timer,
)
from broker.lifecycle.backoff import Outcome, ReconnectDelay, conflict_delay
from broker.lifecycle.inputs import (
    Closed,
    Connected,
    CredentialsUnreadable,
    Event,
    LinkUp,
    Logout,
    Paired,
    PongReceived,
    QrReceived,
    Start,
    Stop,
    TimerFired,
)
from broker.lifecycle.policy import LifecyclePolicy
from broker.lifecycle.reasons import DisconnectCode, parse_code
from broker.lifecycle.states import (
    CONNECTED_STATES,
    HANDSHAKE_TIMED_OUT,
    HANDSHAKE_UNANSWERED,
    PAIRING_TIMED_OUT,
    SPACED_OUT,
    STARTABLE_STATES,
    State,
    credentials_unreadable_reason,
    gave_up_reason,
)
from broker.lifecycle.storm import AttemptBudget

_SLOW_BACKOFF = frozenset({DisconnectCode.UNAVAILABLE, DisconnectCode.RATE_LIMITED})
#: Jitter source of machines not given one: one for all, as a Random holds
#: 2.5 KB of state and a broker runs thousands of machines.
_SHARED_RNG = random.Random()
FIRST_KEEPALIVE_SPREAD = 0.5
"""The first ping of a connection goes after a random 50-100 % of the interval:
sessions that opened together (a failover takes thousands over within seconds)
would otherwise ping in the same instant every interval, for as long as they
stay open; a burst of thousands of pings might hold a broker's event loop
long enough to miss its own heartbeat (suspected at 100k, not shown)."""


class SessionMachine:
    """One session's lifecycle. Not thread-safe; one actor owns it."""

    def __init__(
        self,
        policy: LifecyclePolicy | None = None,
        *,
        rng: random.Random | None = None,
        state: State = State.STOPPED,
        handshake_timeout_s: float | None = None,
    ) -> None:
        """`handshake_timeout_s`: how long a connection that is up may take to say
        `ready` or show a QR, and how long past a QR's expiry the next must come
        (None: no deadline; the actor passes `Settings.connect_timeout_s`)."""
        self.policy = policy or LifecyclePolicy()
        self.handshake_timeout_s = handshake_timeout_s
        self._rng = rng or _SHARED_RNG
        self._state = state
        self._budget = AttemptBudget(self.policy.attempt_burst, self.policy.attempt_rate_per_min)
        #: Time of the latest event that carried one (seconds, the caller's clock).
        self._now = 0.0
        self._attempt = 0
        self._qr: str | None = None
        self._qr_index = 0
        self._qr_expires_at: float | None = None
        self._qr_count = 0
        self._reason = ""
        self._code = 0
        self._armed: set[Timer] = set()
        #: An operator logout was sent upstream; the next close completes it.
        self._logout_pending = False
        #: Credentials arrived on the current connection, so a 515 is the
        #: expected restart rather than an upstream stuck in a restart loop.
        self._paired_here = False

    # -- read-only view -------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def attempt(self) -> int:
        """Consecutive attempts that failed to connect (reset by Start and by OPEN)."""
        return self._attempt

    @property
    def budget(self) -> AttemptBudget:
        """The attempt budget (read it; the machine alone spends it)."""
        return self._budget

    @property
    def qr(self) -> str | None:
        """The QR code to show while PAIRING, else None."""
        return self._qr

    @property
    def qr_index(self) -> int:
        """The upstream's number of the latest QR code (0: none yet)."""
        return self._qr_index

    @property
    def qr_expires_at(self) -> float | None:
        """When the QR on show expires, on the clock of `now`; None unless PAIRING."""
        return self._qr_expires_at

    @property
    def qr_count(self) -> int:
        """QR codes shown since the last Start or OPEN, across pairing rounds."""
        return self._qr_count

    @property
    def reason(self) -> str:
        """Reason of the latest status change."""
        return self._reason

    @property
    def code(self) -> int:
        """Disconnect code behind the latest status change, 0 if none."""
        return self._code

    @property
    def armed_timers(self) -> frozenset[Timer]:
        """Timers the machine believes are running (for diagnostics and tests)."""
        return frozenset(self._armed)

    # -- dispatch -------------------------------------------------------------

    def handle(self, event: Event, *, now: float | None = None) -> list[Action]:
        """Apply one event that happened at `now`; return what the actor must do, in order.

        `now` is seconds on any monotonic clock; only the attempt budget uses it.
        Left out, time stands still since the last event that carried it.
        """
        if now is not None:
            self._now = now
        match event:
            case Start():
                return self._on_start()
            case Stop():
                return self._on_stop()
            case Logout():
                return self._on_logout()
            case LinkUp():
                return self._on_link_up()
            case Connected():
                return self._on_connected()
            case QrReceived():
                return self._on_qr(event)
            case Paired():
                return self._on_paired(event)
            case Closed():
                return self._on_closed(event)
            case CredentialsUnreadable():
                return self._on_credentials_unreadable(event)
            case TimerFired():
                return self._on_timer(event.timer)
            case PongReceived():
                return self._on_pong()
        return []  # pragma: no cover - unknown event types are ignored, not fatal

    # -- operator commands ----------------------------------------------------

    def _on_start(self) -> list[Action]:
        if self._state not in STARTABLE_STATES:
            return []
        self._attempt = 0
        self._qr_count = 0
        return self._cancel_all() + self._open_or_hold("started", 0)

    def _on_stop(self) -> list[Action]:
        if self._state is State.STOPPED:
            return []
        return self._shut_down(State.STOPPED, "stopped", 0,
                               close_code=DisconnectCode.CONNECTION_CLOSED)

    def _on_logout(self) -> list[Action]:
        if self._state is State.LOGGED_OUT:
            # Nothing to leave; wiping again makes the operator's intent certain.
            return [ClearCredentials(), ClearKeys()]
        if self._state is State.OPEN and not self._logout_pending:
            # Let the upstream revoke the login; its 401 close finishes the job.
            self._logout_pending = True
            return [SendLogout()]
        # Not connected (or a second Logout while waiting): log out locally.
        return self._logged_out(DisconnectCode.LOGGED_OUT.text,
                                close_reason="logged out by operator")

    # -- upstream events ------------------------------------------------------

    def _on_link_up(self) -> list[Action]:
        if self._state is not State.CONNECTING or self.handshake_timeout_s is None:
            return []
        return [self._start_timer(Timer.HANDSHAKE, self.handshake_timeout_s)]

    def _on_connected(self) -> list[Action]:
        if self._state not in (State.CONNECTING, State.PAIRING):
            return []
        self._qr_count = 0
        # The attempt worked: a later drop is the network's doing, not a failure
        # to connect. A link that keeps dropping right after `ready` is the
        # attempt budget's business, not the failure count's.
        self._attempt = 0
        actions = self._cancel_all()
        interval = self.policy.keepalive_interval_s
        if interval is not None:
            first = self._rng.uniform(interval * (1 - FIRST_KEEPALIVE_SPREAD), interval)
            actions.append(self._keepalive_in(first))
        actions.append(self._enter(State.OPEN, "connected", 0))
        return actions

    def _on_qr(self, event: QrReceived) -> list[Action]:
        if self._state not in (State.CONNECTING, State.PAIRING):
            return []
        limit = self.policy.max_qr_codes
        if limit and self._qr_count >= limit:
            # The limit holds even if one round rotates more codes than it allows.
            return self._pairing_timed_out(close=True)
        self._qr_count += 1
        self._qr = event.code
        self._qr_index = event.index
        expires_in_s = event.expires_in_ms / 1000
        self._qr_expires_at = self._now + expires_in_s
        actions: list[Action] = []
        if self.handshake_timeout_s is not None:
            # Stray frames (an ack, a pong) are no progress: only the next QR, or
            # pairing and its restart, may come this late.
            actions.append(
                self._start_timer(Timer.HANDSHAKE, expires_in_s + self.handshake_timeout_s)
            )
        actions.append(self._enter(State.PAIRING, "scan the QR code to pair", 0, qr=event.code))
        return actions

    def _on_paired(self, event: Paired) -> list[Action]:
        if self._state not in (State.CONNECTING, State.PAIRING):
            return []
        self._paired_here = True
        return [SaveCredentials(dict(event.credentials))]

    def _on_closed(self, event: Closed) -> list[Action]:
        if self._state not in CONNECTED_STATES:
            return []  # a late close of a connection we already left behind
        code = parse_code(int(event.code))
        reason = event.reason or code.text
        if self._logout_pending:
            return self._logged_out(DisconnectCode.LOGGED_OUT.text)
        if code is DisconnectCode.LOGGED_OUT:
            return self._logged_out(reason)
        if code in (DisconnectCode.BAD_SESSION, DisconnectCode.MULTIDEVICE_MISMATCH):
            # The stored login no longer matches the upstream's: only a new pairing helps.
            return self._fail(reason, code, clear_credentials=True)
        if code is DisconnectCode.FORBIDDEN:
            return self._fail(reason if "ban" in reason.lower() else f"banned ({reason})", code)
        if code is DisconnectCode.CLIENT_OUTDATED:
            # The same client version is refused again on every attempt: a person pins
            # another one (Health says how), reconnecting alone never helps.
            outdated = DisconnectCode.CLIENT_OUTDATED.text
            return self._fail(outdated if reason == code.text or not reason
                              else f"{outdated} ({reason})", code)
        if code is DisconnectCode.REPLACED:
            return self._conflict(reason)
        if code is DisconnectCode.RESTART_REQUIRED:
            if self._state is State.CONNECTING and not self._paired_here:
                # Restart demanded before this connection got anywhere: treat it as
                # a failed attempt, or a looping upstream would get a reconnect storm.
                return self._backoff(reason, code, Outcome.FAILED)
            return self._reconnect_now(reason, code)
        if code is DisconnectCode.TIMED_OUT and self._state is State.PAIRING:
            limit = self.policy.max_qr_codes
            if limit and self._qr_count >= limit:
                return self._pairing_timed_out(close=False)
            return self._reconnect_now("QR expired, requesting a new one", code)
        if code in _SLOW_BACKOFF:
            retry_after_s = None
            if event.retry_after_ms is not None:
                retry_after_s = event.retry_after_ms / 1000.0
            return self._backoff(reason, code, Outcome.REFUSED, retry_after_s=retry_after_s)
        # 428 / 408 / 400: lost. Had this connection opened (a QR counts: the
        # upstream answered), or did the attempt itself fail?
        opened = self._state in (State.OPEN, State.PAIRING)
        return self._backoff(reason, code, Outcome.DROPPED if opened else Outcome.FAILED)

    def _on_credentials_unreadable(self, event: CredentialsUnreadable) -> list[Action]:
        """Permanent: no reconnect can open credentials no configured key decrypts, and
        they are kept (the right key may come back), unlike a 500's corrupt ones."""
        if self._state is not State.CONNECTING:
            return []
        return self._fail(credentials_unreadable_reason(event.key_id), 0)

    def _on_pong(self) -> list[Action]:
        if self._state is not State.OPEN or Timer.PONG not in self._armed:
            return []
        actions: list[Action] = [self._cancel_timer(Timer.PONG)]
        if self.policy.keepalive_interval_s is not None:
            actions.append(self._keepalive_in(self.policy.keepalive_interval_s))
        return actions

    def _on_timer(self, timer: Timer) -> list[Action]:
        if timer not in self._armed:
            return []  # stale: cancelled, or never armed by this machine
        self._armed.discard(timer)
        if timer is Timer.HANDSHAKE and self._state in (State.CONNECTING, State.PAIRING):
            # As if the upstream had closed with 408: a round of pairing that ran
            # out starts the next (or gives up), a silent connect is a failed attempt.
            close: list[Action] = [CloseConnection(DisconnectCode.TIMED_OUT, HANDSHAKE_TIMED_OUT)]
            return close + self._on_closed(Closed(DisconnectCode.TIMED_OUT, HANDSHAKE_UNANSWERED))
        if timer is Timer.RETRY and self._state in (State.RECONNECTING, State.CONFLICT):
            if not self._budget.take(self._now):
                # Fired before the budget's refill (a clock tick early, or the delay
                # was planned before another attempt): wait out the rest, quietly.
                return [self._start_timer(Timer.RETRY, self._budget.hold(self._now))]
            reason = "retrying after conflict" if self._state is State.CONFLICT else "reconnecting"
            return [OpenConnection(), self._enter(State.CONNECTING, reason, 0)]
        if self._state is not State.OPEN:
            return []
        if timer is Timer.KEEPALIVE:
            return [SendPing(), self._start_timer(Timer.PONG, self.policy.keepalive_timeout_s)]
        if timer is Timer.PONG:
            reason = "keep-alive timed out"
            actions: list[Action] = [CloseConnection(DisconnectCode.TIMED_OUT, reason)]
            if self._logout_pending:
                return actions + self._logged_out(DisconnectCode.LOGGED_OUT.text)
            return actions + self._backoff(reason, DisconnectCode.TIMED_OUT, Outcome.DROPPED)
        return []  # pragma: no cover - RETRY, HANDSHAKE are never armed in OPEN

    # -- transitions ----------------------------------------------------------

    def _backoff(
        self,
        reason: str,
        code: DisconnectCode,
        outcome: Outcome,
        *,
        retry_after_s: float | None = None,
    ) -> list[Action]:
        """The connection is gone: wait for the next attempt, or give up past the limit.

        A failure (FAILED, REFUSED) counts towards `max_attempts` and widens the
        backoff; a drop after opening does neither. Then the attempt budget may
        hold the attempt back further.
        """
        if outcome is not Outcome.DROPPED:
            self._attempt += 1
            limit = self.policy.max_attempts
            if limit and self._attempt > limit:
                return self._fail(gave_up_reason(self._attempt), code)
        p = self.policy
        delays = ReconnectDelay(
            initial_s=p.backoff_initial_s, max_s=p.backoff_max_s,
            slow_initial_s=p.slow_backoff_initial_s, slow_max_s=p.slow_backoff_max_s,
            redial_max_s=p.redial_max_s, rng=self._rng,
        )
        delay = delays(outcome, self._attempt, retry_after_s=retry_after_s)
        held = self._budget.hold(self._now + delay)
        if held:
            reason = f"{reason}; {SPACED_OUT}"
        actions = self._cancel_all()
        actions.append(self._start_timer(Timer.RETRY, delay + held))
        actions.append(
            self._enter(
                State.RECONNECTING, reason, int(code), retry_in_s=delay + held, held_s=held
            )
        )
        return actions

    def _reconnect_now(self, reason: str, code: DisconnectCode) -> list[Action]:
        """A fresh connection without backoff (515, a new pairing round); no failure counted."""
        return self._cancel_all() + self._open_or_hold(reason, int(code))

    def _open_or_hold(self, reason: str, code: int) -> list[Action]:
        """Connect now if the attempt budget allows it, else wait for it in RECONNECTING.

        Callers have cancelled every timer.
        """
        if self._budget.take(self._now):
            return [OpenConnection(), self._enter(State.CONNECTING, reason, code)]
        held = self._budget.hold(self._now)
        return [
            self._start_timer(Timer.RETRY, held),
            self._enter(
                State.RECONNECTING, f"{reason}; {SPACED_OUT}", code, retry_in_s=held, held_s=held
            ),
        ]

    def _conflict(self, reason: str) -> list[Action]:
        """Someone else took the login: never fight; maybe look again much later."""
        actions = self._cancel_all()
        delay: float | None = None
        if self.policy.conflict_retry_s is not None:
            delay = conflict_delay(
                self.policy.conflict_retry_s, self._rng, jitter=self.policy.conflict_jitter
            )
            actions.append(self._start_timer(Timer.RETRY, delay))
        actions.append(self._enter(State.CONFLICT, reason, int(DisconnectCode.REPLACED),
                                   retry_in_s=delay))
        return actions

    def _fail(
        self, reason: str, code: DisconnectCode | int, *, clear_credentials: bool = False
    ) -> list[Action]:
        """Give up until an operator acts (connection already gone)."""
        actions = self._cancel_all()
        if clear_credentials:
            actions += [ClearCredentials(), ClearKeys()]
        actions.append(self._enter(State.FAILED, reason, int(code)))
        return actions

    def _pairing_timed_out(self, *, close: bool) -> list[Action]:
        actions: list[Action] = []
        if close:
            actions.append(CloseConnection(DisconnectCode.TIMED_OUT, PAIRING_TIMED_OUT))
        return actions + self._fail(PAIRING_TIMED_OUT, DisconnectCode.TIMED_OUT)

    def _logged_out(self, reason: str, *, close_reason: str | None = None) -> list[Action]:
        """Credentials are gone for good: wipe them and wait for a new pairing."""
        actions: list[Action] = []
        if close_reason is not None and self._state in CONNECTED_STATES:
            actions.append(CloseConnection(DisconnectCode.LOGGED_OUT, close_reason))
        actions.extend(self._cancel_all())
        actions += [ClearCredentials(), ClearKeys()]
        actions.append(self._enter(State.LOGGED_OUT, reason, int(DisconnectCode.LOGGED_OUT)))
        return actions

    def _shut_down(
        self, state: State, reason: str, code: int, *, close_code: DisconnectCode
    ) -> list[Action]:
        """Close whatever is open, stop every timer, and sit still in `state`."""
        actions: list[Action] = []
        if self._state in CONNECTED_STATES:
            actions.append(CloseConnection(close_code, reason))
        actions.extend(self._cancel_all())
        actions.append(self._enter(state, reason, code))
        return actions

    def _enter(
        self,
        state: State,
        reason: str,
        code: int,
        *,
        retry_in_s: float | None = None,
        qr: str | None = None,
        held_s: float = 0.0,
    ) -> Emit:
        """Switch state and describe the switch; callers have already cancelled timers."""
        previous = self._state
        self._state = state
        self._reason = reason
        self._code = code
        if state is not State.PAIRING:
            self._qr = None
            self._qr_expires_at = None
        if state is not State.OPEN:
            self._logout_pending = False
        self._paired_here = False
        return Emit(
            state=state,
            previous=previous,
            reason=reason,
            code=code,
            retry_in_s=retry_in_s,
            qr=qr,
            attempt=self._attempt,
            held_s=held_s,
        )

    # -- timers ---------------------------------------------------------------

    def _start_timer(self, timer: Timer, delay_s: float, slack_s: float = 0.0) -> StartTimer:
        self._armed.add(timer)
        return StartTimer(timer, delay_s, slack_s)

    def _keepalive_in(self, delay_s: float) -> StartTimer:
        """The next ping, allowed the policy's slack (a tenth of the interval at most)."""
        interval = self.policy.keepalive_interval_s or delay_s
        slack = min(self.policy.keepalive_slack_s, interval / 10)
        return self._start_timer(Timer.KEEPALIVE, delay_s, slack)

    def _cancel_timer(self, timer: Timer) -> CancelTimer:
        self._armed.discard(timer)
        return CancelTimer(timer)

    def _cancel_all(self) -> list[Action]:
        """Cancel every armed timer, in `Timer` declaration order (stable for tests)."""
        return [self._cancel_timer(t) for t in Timer if t in self._armed]
