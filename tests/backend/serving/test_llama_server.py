import numpy as np
from llama_cpp.llama import LlamaState

from backend.serving.llama_server import BoundedRAMCache


def state(n_tokens: int, *, kv_bytes: int, vocab: int) -> LlamaState:
    return LlamaState(
        input_ids=np.arange(n_tokens, dtype=np.intc),
        scores=np.zeros((8, vocab), dtype=np.single),
        n_tokens=n_tokens,
        llama_state=b"\0" * kv_bytes,
        llama_state_size=kv_bytes,
        seed=0,
    )


def test_size_counts_logits_and_tokens() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9)
    cache[(1, 2, 3)] = state(3, kv_bytes=1000, vocab=1000)
    assert cache.cache_size == 1000 + 8 * 1000 * 4 + 3 * 4


def test_eviction_bounds_real_memory() -> None:
    entry = 1000 + 8 * 1000 * 4 + 3 * 4
    cache = BoundedRAMCache(capacity_bytes=2 * entry)
    for first in range(5):
        cache[(first, 2, 3)] = state(3, kv_bytes=1000, vocab=1000)
    assert len(cache.cache_state) == 2
    assert cache.cache_size <= 2 * entry


def test_longest_prefix_still_found() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9)
    cache[(1, 2, 3)] = state(3, kv_bytes=10, vocab=10)
    assert (1, 2, 3, 4, 5) in cache
