import pytest

from backend.chat.shaping import Tier
from backend.serving.degrade import choose_tier
from backend.serving.pool import ReplicaLoad

IDLE = ReplicaLoad()


@pytest.mark.parametrize(
    ("depth", "load", "waited", "tier"),
    [
        (0, IDLE, 0.0, Tier.NORMAL),
        (1, IDLE, 0.0, Tier.NORMAL),  # a burst being seated: 1 of 8 waits
        (2, IDLE, 0.0, Tier.NORMAL),
        (3, IDLE, 0.0, Tier.REDUCED),  # more than a quarter of the capacity waits
        (8, IDLE, 0.0, Tier.BRIEF),
        (0, ReplicaLoad(waiting=4), 0.0, Tier.REDUCED),
        (0, ReplicaLoad(waiting=16), 0.0, Tier.BRIEF),
        (0, ReplicaLoad(kv_cache_usage=0.75), 0.0, Tier.REDUCED),
        (0, ReplicaLoad(kv_cache_usage=0.95), 0.0, Tier.BRIEF),
        (0, IDLE, 0.6, Tier.REDUCED),
        (1, IDLE, 0.6, Tier.REDUCED),
        (3, IDLE, 0.6, Tier.BRIEF),
        (8, IDLE, 0.9, Tier.BRIEF),
    ],
)
def test_tier_table(depth: int, load: ReplicaLoad, waited: float, tier: Tier) -> None:
    assert choose_tier(queue_depth=depth, capacity=8, load=load, waited_fraction=waited) is tier


def test_no_capacity_is_busy() -> None:
    assert choose_tier(queue_depth=0, capacity=0, load=IDLE) is Tier.BUSY
