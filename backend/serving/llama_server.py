"""The CPU engine's entry point: llama-cpp-python's OpenAI server with a lean, bounded prompt cache.

`python -m backend.serving.llama_server` takes exactly `python -m llama_cpp.server`'s arguments.

Why not that module directly. Its RAM prompt cache (`--cache_type ram`) saves the model state after
every answer and restores the longest matching prefix for the next request; that is what keeps a
pinned conversation's prefill short on CPU. But each saved state also carries a copy of the logits
buffer (n_batch × n_vocab float32: ~300 MiB with Qwen's 151,936-token vocabulary), which:

- is never read when `logits_all` is off (the default): sampling happens inside llama.cpp, and a
  restored state is re-evaluated before sampling (`_requires_eval`);
- is not counted against `--cache_size`, so memory grew ~300 MiB per conversation without bound;
- costs a 300 MiB copy on every save and every restore (0.5-1.5 s on two cores).

Here, with `logits_all` off, states are saved and restored without the logits (`LeanLlama`), and
`BoundedRAMCache` counts every byte an entry holds and keeps one state per conversation. With
`logits_all` on the library's own methods run unchanged. Written against llama-cpp-python 0.3.x
(pinned < 0.4).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np
from llama_cpp.llama import Llama, LlamaState
from llama_cpp.llama_cache import BaseLlamaCache, LlamaRAMCache


class BoundedRAMCache(LlamaRAMCache):
    """LlamaRAMCache whose size is what its entries really hold (KV state, logits, token ids), and
    which keeps one entry per conversation rather than one per turn.

    The server saves a state after every answer under prompt + answer tokens. An entry whose key
    is a prefix of the new key can no longer serve any request better than the new one (a request
    that branches off inside it restores the new state and re-evaluates from the branch, as it
    would from the old one), yet upstream keeps it until the LRU evicts it; and since a lookup
    marks the entry it found as recent, under turn-by-turn traffic the LRU evicts the newest
    state of a conversation that has not come back yet before those stale prefixes
    (tests/backend/serving/test_llama_server.py). Here inserting a state drops the entries it
    extends.

    The next turn's prompt carries the previous reply as text, re-tokenized (or, for Qwen3,
    without its reasoning), so the new key may diverge from the old one inside that reply rather
    than extend it. With `turn_start` set to the token that opens a chat message (ChatML's
    `<|im_start|>`; `LeanLlama.set_cache` sets it), inserting a state also drops every entry that
    agrees with the new key up to and including the `turn_start` token opening the entry's last
    message: the same messages before it, then another message in its place (the reply
    re-rendered or regenerated; after a warm-up on the system prompt alone, the first question).
    Such an entry could beat the new one only on the tokens of that last message, which the
    conversation no longer holds in that form. An entry of another
    conversation diverges from the new key long before its last message (at the first user
    message if only the system prompt is shared), as does one whose history branches off
    earlier; both are kept. Two conversations opening with the same messages are
    indistinguishable from one regenerating its reply: after the first turn only the later one's
    state is kept, and the earlier one re-evaluates its first reply on its next turn.

    Mutation is not thread-safe; the server handles one request at a time."""

    def __init__(self, capacity_bytes: int = 2 << 30, *, turn_start: int | None = None) -> None:
        """`capacity_bytes` bounds `cache_size`; `turn_start` is the token id that opens a chat
        message, or None to drop only the entries a new key extends."""
        super().__init__(capacity_bytes)
        self.turn_start = turn_start

    @property
    def cache_size(self) -> int:
        return sum(
            state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes
            for state in self.cache_state.values()
        )

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        new = tuple(key)
        for old in [k for k in self.cache_state if self._superseded(k, by=new)]:
            del self.cache_state[old]
        super().__setitem__(new, value)

    def _superseded(self, old: tuple[int, ...], *, by: tuple[int, ...]) -> bool:
        """Whether a state saved under `by` replaces the entry under `old` (see the class)."""
        if len(old) < len(by) and by[: len(old)] == old:
            return True
        if self.turn_start is None:
            return False
        try:  # index of the last turn_start in old; slicing and index() run in C
            last = len(old) - 1 - old[::-1].index(self.turn_start)
        except ValueError:
            return False
        return by[: last + 1] == old[: last + 1]


class LeanLlama(Llama):
    """`Llama` whose saved states leave out the logits copy when `logits_all` is off, and which
    tells a `BoundedRAMCache` its chat-message token."""

    def set_cache(self, cache: BaseLlamaCache | None) -> None:
        """Use `cache` for prompt states. A `BoundedRAMCache` gets `turn_start` = the id of
        `<|im_start|>` if this model's vocabulary has it as one token, else None."""
        super().set_cache(cache)
        if isinstance(cache, BoundedRAMCache):
            ids = self.tokenize(b"<|im_start|>", add_bos=False, special=True)
            cache.turn_start = ids[0] if len(ids) == 1 else None

    def save_state(self) -> LlamaState:
        if self._logits_all:
            return super().save_state()
        context = self._ctx.ctx
        size = llama_cpp.llama_state_get_size(context)
        buffer = (ctypes.c_uint8 * int(size))()
        written = int(llama_cpp.llama_state_get_data(context, buffer, size))
        if written > int(size):
            raise RuntimeError("Failed to copy llama state data")
        return LlamaState(
            input_ids=self.input_ids[: self.n_tokens].copy(),
            scores=np.empty((0, self._n_vocab), dtype=np.single),  # zero rows: nothing copied
            n_tokens=self.n_tokens,
            llama_state=ctypes.string_at(buffer, written),
            llama_state_size=written,
            seed=self._seed,
        )

    def load_state(self, state: LlamaState) -> None:
        if self._logits_all or state.scores.shape[0] != 0:
            super().load_state(state)
            return
        self.input_ids[: state.n_tokens] = state.input_ids
        self.n_tokens = state.n_tokens
        self._requires_eval = True  # re-evaluate the last token before sampling, as upstream does
        self._seed = state.seed
        size = state.llama_state_size
        data = (ctypes.c_uint8 * size).from_buffer_copy(state.llama_state)
        if llama_cpp.llama_state_set_data(self._ctx.ctx, data, size) != size:
            raise RuntimeError("Failed to set llama state data")


def install() -> None:
    """Make the server (which looks both up on the `llama_cpp` module when it loads the model)
    build our model class and cache."""
    llama_cpp.Llama = LeanLlama  # type: ignore[misc]
    llama_cpp.LlamaRAMCache = BoundedRAMCache  # type: ignore[attr-defined]


def main() -> None:
    install()
    from llama_cpp.server.__main__ import main as serve

    serve()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
