"""CircuitBreaker on an injected clock: opens after the threshold, one half-open trial, closes on
its success and reopens on its failure."""

from __future__ import annotations

from backend.serving.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=Clock())
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()


def test_breaker_half_open_allows_one_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=clock)
    breaker.record_failure()
    clock.now = 10.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_breaker_trial_success_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=clock)
    breaker.record_failure()
    clock.now = 10.0
    breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_trial_failure_reopens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=clock)
    breaker.record_failure()
    clock.now = 10.0
    breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
