"""How long a node takes to answer: an exponentially weighted moving average.

Seeded by the target's ``expected_latency_s`` (None: unknown until the first
call is measured). The router uses it with a client deadline: an edge attempt
whose expected latency would not leave the cloud time to answer is skipped.

A call that timed out took at least as long as it waited, so it raises the
estimate to that bound (a node that only ever times out would otherwise look
fast forever) but never lowers it.
"""

from __future__ import annotations

ALPHA = 0.3  # weight of the newest call: recent behaviour dominates within ~5 calls


class LatencyEstimate:
    def __init__(self, initial_s: float | None = None) -> None:
        self._value = initial_s
        self.samples = 0

    @property
    def seconds(self) -> float | None:
        """The expected latency of the next call; None when nothing is known."""
        return self._value

    def observe(self, seconds: float) -> None:
        """A completed call took ``seconds``."""
        self.samples += 1
        if self._value is None:
            self._value = seconds
        else:
            self._value += ALPHA * (seconds - self._value)

    def observe_at_least(self, seconds: float) -> None:
        """A call gave up after ``seconds`` (timed out): it would have taken longer."""
        if self._value is None or seconds > self._value:
            self.observe(seconds)
