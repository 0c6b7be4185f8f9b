"""A circuit breaker per engine replica: after repeated failures the replica gets no requests for a
while, then one trial request decides whether it is back (closed) or not (open again)."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `reset_s` lets one trial through
    (half-open): its success closes the breaker, its failure opens it again. Not thread-safe;
    used from one event loop."""

    def __init__(
        self, *, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_out = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self._reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether a request may go to this replica now (claims the half-open trial)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_out:
            self._trial_out = True
            return True
        return False

    def record_success(self) -> None:
        self._failures, self._opened_at, self._trial_out = 0, None, False

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_out = False
        if self._opened_at is not None or self._failures >= self._threshold:
            self._opened_at = self._clock()
