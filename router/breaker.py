"""A circuit breaker per model node: a node that keeps failing is cooled down.

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(cooldown over)──▶ half-open: ONE trial call is let through
    half-open ──trial succeeds──▶ closed
    half-open ──trial fails──▶ open again, cooldown doubled (up to max_cooldown_s)

While open, the router does not ask the node at all: a dead node costs no
connection attempt or timeout per request, and a recovering one is not flooded
the moment it comes back. Any success closes the circuit (a call admitted
before it opened may still succeed: that is evidence the node works).

``snapshot()`` is the read-only view for Status and metrics. The clock is
injectable so tests can step through cooldowns without sleeping.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from router.guard_settings import BreakerSettings


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSnapshot:
    state: BreakerState
    consecutive_failures: int
    cooldown_remaining_s: float  # > 0 only while open
    times_opened: int  # since the router started
    last_error: str


class CircuitBreaker:
    def __init__(
        self,
        settings: BreakerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or BreakerSettings()  # replaced on a config reload
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = self.settings.cooldown_s
        self._open_until = 0.0
        self._trial_started: float | None = None
        self._times_opened = 0
        self._last_error = ""

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            return BreakerState.HALF_OPEN  # due for a trial
        return self._state

    def cooldown_remaining(self) -> float:
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def allow(self) -> bool:
        """May the node be asked now? In half-open, True for one trial at a time.

        A trial whose outcome never arrives (the request was cancelled) does not
        block the node forever: after another cooldown a new trial is allowed.
        """
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now < self._open_until:
                return False
            self._state = BreakerState.HALF_OPEN
            self._trial_started = now
            return True
        if self._trial_started is not None and now - self._trial_started < self._cooldown:
            return False  # a trial is already in flight
        self._trial_started = now
        return True

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = self.settings.cooldown_s
        self._trial_started = None

    def record_failure(self, detail: str = "") -> None:
        self._failures += 1
        self._last_error = detail or self._last_error
        if self._state is BreakerState.HALF_OPEN:
            self._open(min(self._cooldown * 2, self.settings.max_cooldown_s))
        elif self._state is BreakerState.CLOSED:
            if self._failures >= self.settings.failure_threshold:
                self._open(self.settings.cooldown_s)

    def _open(self, cooldown: float) -> None:
        self._state = BreakerState.OPEN
        self._cooldown = cooldown
        self._open_until = self._clock() + cooldown
        self._trial_started = None
        self._times_opened += 1

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(
            state=self.state,
            consecutive_failures=self._failures,
            cooldown_remaining_s=self.cooldown_remaining(),
            times_opened=self._times_opened,
            last_error=self._last_error,
        )
