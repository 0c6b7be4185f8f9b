from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp.llama import LlamaState
from llama_cpp.llama_types import ChatCompletionRequestMessage

from backend.serving.llama_server import BoundedRAMCache, LeanLlama


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


def test_a_state_replaces_the_states_it_extends() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9)
    cache[(1, 2)] = state(2, kv_bytes=10, vocab=10)  # conversation A, turn 1
    cache[(7, 8)] = state(2, kv_bytes=10, vocab=10)  # conversation B
    cache[(1, 2, 3, 4)] = state(4, kv_bytes=10, vocab=10)  # A, turn 2: extends (1, 2)
    cache[(1, 5)] = state(2, kv_bytes=10, vocab=10)  # a branch of A: extends nothing stored
    assert list(cache.cache_state) == [(7, 8), (1, 2, 3, 4), (1, 5)]
    cache[(1, 2, 3, 4)] = state(4, kv_bytes=10, vocab=10)  # the same key again: one entry
    assert len(cache.cache_state) == 3


def test_turn_by_turn_traffic_keeps_every_conversation_that_fits() -> None:
    """Three conversations taking turns, a cache for three final states: every next turn finds
    its conversation's latest state (upstream's LRU kept the stale prefixes and lost those)."""
    entry = 10 + 8 * 10 * 4  # bytes of a state apart from its token ids
    cache = BoundedRAMCache(capacity_bytes=3 * (entry + 6 * 4 * 4))
    history: dict[int, tuple[int, ...]] = {c: (c,) for c in range(3)}
    for turn in range(6):
        for c in range(3):
            if turn:  # the server's lookup (it also marks the entry as recently used)
                assert cache[history[c] + (99,)].n_tokens == len(history[c]), (turn, c)
            history[c] += (c,) * 3
            cache[history[c]] = state(len(history[c]), kv_bytes=10, vocab=10)
    assert len(cache.cache_state) == 3


IM_START = 0
"""The turn-start token in the fake chat keys below."""
SYSTEM, QUESTION, OTHER_QUESTION = (1, 2), (3, 4), (5, 6)


def chat(*messages: tuple[int, ...]) -> tuple[int, ...]:
    """A ChatML-like key: each message opens with IM_START."""
    return tuple(token for message in messages for token in (IM_START, *message))


def test_a_reply_that_re_tokenizes_differently_is_replaced() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9, turn_start=IM_START)
    cache[chat(SYSTEM, QUESTION, (7, 8, 9))] = state(9, kv_bytes=10, vocab=10)  # generated reply
    turn_2 = chat(SYSTEM, QUESTION, (7, 89), (10,), (11,))  # the reply's text re-tokenized
    cache[turn_2] = state(len(turn_2), kv_bytes=10, vocab=10)
    assert list(cache.cache_state) == [turn_2]


def test_a_warm_up_state_is_replaced_by_the_first_turn() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9, turn_start=IM_START)
    cache[chat(SYSTEM, (7,))] = state(5, kv_bytes=10, vocab=10)  # system prompt, one token
    first_turn = chat(SYSTEM, QUESTION, (8, 9))
    cache[first_turn] = state(len(first_turn), kv_bytes=10, vocab=10)
    assert list(cache.cache_state) == [first_turn]


def test_another_conversation_with_the_same_system_prompt_is_kept() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9, turn_start=IM_START)
    other = chat(SYSTEM, OTHER_QUESTION, (7,), (10,), (11, 12))
    cache[other] = state(len(other), kv_bytes=10, vocab=10)
    cache[chat(SYSTEM, QUESTION, (7,))] = state(7, kv_bytes=10, vocab=10)
    assert other in cache.cache_state


def test_a_longer_history_branched_off_earlier_is_kept() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9, turn_start=IM_START)
    old = chat(SYSTEM, QUESTION, (7,), (10,), (11, 12, 13))
    cache[old] = state(len(old), kv_bytes=10, vocab=10)
    edited = chat(SYSTEM, OTHER_QUESTION, (8,))  # the first question edited, answered anew
    cache[edited] = state(len(edited), kv_bytes=10, vocab=10)
    assert old in cache.cache_state


def test_a_branch_right_before_the_reply_is_kept() -> None:
    """Agreeing on every token before the reply's IM_START is not enough: the new key must open
    a message there too (here the question was edited by appending to it)."""
    cache = BoundedRAMCache(capacity_bytes=10**9, turn_start=IM_START)
    old = chat(SYSTEM, QUESTION, (7,))
    cache[old] = state(len(old), kv_bytes=10, vocab=10)
    cache[chat(SYSTEM, (*QUESTION, 9), (7,))] = state(8, kv_bytes=10, vocab=10)
    assert old in cache.cache_state


def test_without_turn_start_only_prefixes_are_replaced() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9)
    cache[chat(SYSTEM, QUESTION, (7, 8, 9))] = state(9, kv_bytes=10, vocab=10)
    turn_2 = chat(SYSTEM, QUESTION, (7, 89), (10,), (11,))
    cache[turn_2] = state(len(turn_2), kv_bytes=10, vocab=10)
    assert len(cache.cache_state) == 2


def test_longest_prefix_still_found() -> None:
    cache = BoundedRAMCache(capacity_bytes=10**9)
    cache[(1, 2, 3)] = state(3, kv_bytes=10, vocab=10)
    assert (1, 2, 3, 4, 5) in cache


class CountingLlama(LeanLlama):
    loads = 0

    def load_state(self, state: LlamaState) -> None:
        self.loads += 1
        super().load_state(state)


@pytest.fixture(scope="module")
def lean(tiny_gguf: Path) -> Iterator[CountingLlama]:
    model = CountingLlama(model_path=str(tiny_gguf), n_ctx=512, n_threads=1, verbose=False, seed=1)
    model.set_cache(BoundedRAMCache(capacity_bytes=64 << 20))
    yield model
    model.close()


def greedy(model: Llama, prompt: str) -> str:
    out = model.create_completion(prompt, max_tokens=12, temperature=0.0, top_k=1)
    return str(out["choices"][0]["text"])  # type: ignore[index]


def test_lean_state_holds_no_logits(lean: LeanLlama) -> None:
    greedy(lean, "你好，今天天气")
    state = lean.save_state()
    assert state.scores.nbytes == 0 and state.n_tokens > 0


def test_restored_state_continues_like_a_fresh_model(lean: CountingLlama, tiny_gguf: Path) -> None:
    first, second = "第一个对话：你好，请介绍一下你自己。", "第二个对话：今天天气怎么样？"
    greedy(lean, first)
    greedy(lean, second)  # the live context now holds another conversation
    loads = lean.loads
    cached = greedy(lean, first + "还有呢？")  # restored from the cache, then extended
    assert lean.loads == loads + 1
    fresh_model = Llama(model_path=str(tiny_gguf), n_ctx=512, n_threads=1, verbose=False, seed=1)
    try:
        fresh = greedy(fresh_model, first + "还有呢？")
    finally:
        fresh_model.close()
    assert cached == fresh


def test_cache_entries_are_small(lean: LeanLlama) -> None:
    greedy(lean, "一个新的提示词，用来写入缓存。")
    cache = lean.cache
    assert isinstance(cache, BoundedRAMCache)
    assert all(state.scores.nbytes == 0 for state in cache.cache_state.values())


def test_set_cache_finds_the_turn_start(lean: LeanLlama) -> None:
    cache = lean.cache
    assert isinstance(cache, BoundedRAMCache) and cache.turn_start is not None
    assert lean.detokenize([cache.turn_start], special=True) == b"<|im_start|>"


def test_a_chat_keeps_one_state(tiny_gguf: Path) -> None:
    """With this seed the tiny model's replies re-tokenize differently in the next prompt, so
    without the turn rule the cache would hold one state per turn."""
    model = LeanLlama(model_path=str(tiny_gguf), n_ctx=512, n_threads=1, verbose=False, seed=1)
    try:
        cache = BoundedRAMCache(capacity_bytes=64 << 20)
        model.set_cache(cache)
        messages: list[ChatCompletionRequestMessage] = [
            {"role": "system", "content": "你是一个助手。"}
        ]
        for question in ("你好，请介绍一下你自己。", "今天天气怎么样？", "还有呢？"):
            messages.append({"role": "user", "content": question})
            out = model.create_chat_completion(messages, max_tokens=12, temperature=1.0, seed=3)
            reply = str(out["choices"][0]["message"]["content"])  # type: ignore[index]
            messages.append({"role": "assistant", "content": reply})
    finally:
        model.close()
    assert len(cache.cache_state) == 1
