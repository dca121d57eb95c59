"""router.breaker: the circuit breaker's states, stepped with a fake clock."""

from __future__ import annotations

from router.breaker import BreakerState, CircuitBreaker
from router.guard_settings import BreakerSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(threshold: int = 3, cooldown: float = 10.0, max_cooldown: float = 35.0):
    clock = Clock()
    settings = BreakerSettings(
        failure_threshold=threshold, cooldown_s=cooldown, max_cooldown_s=max_cooldown
    )
    return CircuitBreaker(settings, clock), clock


def test_opens_after_threshold_consecutive_failures_only() -> None:
    b, _ = breaker(threshold=3)
    b.record_failure("x")
    b.record_failure("x")
    b.record_success()  # resets the count: failures must be consecutive
    b.record_failure("x")
    b.record_failure("x")
    assert b.allow() and b.state is BreakerState.CLOSED
    b.record_failure("UNAVAILABLE: connection refused")
    snap = b.snapshot()
    assert snap.state is BreakerState.OPEN and snap.consecutive_failures == 3
    assert snap.cooldown_remaining_s == 10.0 and snap.times_opened == 1
    assert snap.last_error == "UNAVAILABLE: connection refused"
    assert not b.allow()


def test_one_trial_after_cooldown_then_closed_on_success() -> None:
    b, clock = breaker(threshold=1, cooldown=10.0)
    b.record_failure()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.1
    assert b.state is BreakerState.HALF_OPEN and b.snapshot().cooldown_remaining_s == 0.0
    assert b.allow()  # the trial
    assert not b.allow()  # only one at a time
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()
    assert b.snapshot().consecutive_failures == 0


def test_failed_trial_doubles_the_cooldown_up_to_the_max() -> None:
    b, clock = breaker(threshold=1, cooldown=10.0, max_cooldown=35.0)
    b.record_failure()
    for expected in (20.0, 35.0, 35.0):
        clock.now += 1000
        assert b.allow()
        b.record_failure()
        assert b.cooldown_remaining() == expected
    b.record_success()
    b.record_failure()
    assert b.cooldown_remaining() == 10.0  # success reset the cooldown


def test_a_lost_trial_does_not_block_the_node_forever() -> None:
    b, clock = breaker(threshold=1, cooldown=10.0)
    b.record_failure()
    clock.now += 10
    assert b.allow()  # trial admitted, its outcome never arrives (request cancelled)
    clock.now += 5
    assert not b.allow()
    clock.now += 5
    assert b.allow()


def test_reloaded_settings_apply_to_the_next_opening() -> None:
    b, _ = breaker(threshold=5)
    b.settings = BreakerSettings(failure_threshold=1, cooldown_s=2.0, max_cooldown_s=2.0)
    b.record_failure()
    assert b.state is BreakerState.OPEN and b.cooldown_remaining() == 2.0
