"""Degradation tiers: how much to give each answer under load.

The tier is read off three signals, each optional: the slot queue's depth relative to total slot
capacity, the engines' own waiting requests (vLLM `num_requests_waiting`) and their KV-cache usage
(`gpu_cache_usage_perc`). The highest tier any signal reaches wins:

| tier    | queue depth ÷ capacity | engine waiting | KV-cache usage | effect (backend/chat/shaping.py)       |
|---------|------------------------|----------------|----------------|----------------------------------------|
| NORMAL  | 0                      | < 4            | < 0.75         | full answer                             |
| REDUCED | > 0                    | ≥ 4            | ≥ 0.75         | fewer max_tokens, fewer retrieved chunks|
| BRIEF   | ≥ 1                    | ≥ 16           | ≥ 0.90         | a one-sentence answer                   |
| BUSY    | queue full or wait budget spent                          || no engine call: a busy notice + retry time |

A request that waited in the queue past half its budget is served one tier lower than it would be.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.chat.shaping import Tier
from backend.serving.pool import ReplicaLoad


@dataclass(frozen=True)
class Thresholds:
    """(REDUCED, BRIEF) thresholds per signal."""

    # A few waiters for a moment is a burst being seated, not overload: REDUCED once more than a
    # quarter of the capacity waits (bench/overhead.py saw bursts degraded at any depth above 0).
    queue_ratio: tuple[float, float] = (0.25, 1.0)
    waiting: tuple[float, float] = (4.0, 16.0)
    kv_cache_usage: tuple[float, float] = (0.75, 0.90)


DEFAULT_THRESHOLDS = Thresholds()


def _tier_of(value: float | None, bounds: tuple[float, float], *, strict_low: bool) -> Tier:
    if value is None:
        return Tier.NORMAL
    low, high = bounds
    if value >= high:
        return Tier.BRIEF
    if value > low if strict_low else value >= low:
        return Tier.REDUCED
    return Tier.NORMAL


def choose_tier(
    *,
    queue_depth: int,
    capacity: int,
    load: ReplicaLoad,
    waited_fraction: float = 0.0,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> Tier:
    """The tier for a request about to be shaped.

    `capacity` is the total slot capacity of available replicas; 0 means none is available and
    gives BUSY. `waited_fraction` is the share of the queue's wait budget this request spent.
    """
    if capacity <= 0:
        return Tier.BUSY
    tier = max(
        _tier_of(queue_depth / capacity, thresholds.queue_ratio, strict_low=True),
        _tier_of(load.waiting, thresholds.waiting, strict_low=False),
        _tier_of(load.kv_cache_usage, thresholds.kv_cache_usage, strict_low=False),
    )
    if waited_fraction >= 0.5 and tier < Tier.BRIEF:
        tier = Tier(tier + 1)
    return tier
