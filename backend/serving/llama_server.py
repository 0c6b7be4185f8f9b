"""The CPU engine's entry point: llama-cpp-python's OpenAI server with an honestly bounded prompt cache.

`python -m backend.serving.llama_server` takes exactly `python -m llama_cpp.server`'s arguments.

Why not that module directly: its RAM prompt cache (`--cache_type ram --cache_size BYTES`) counts only
each entry's KV state against the cap, but every entry also holds a copy of the logits buffer
(n_batch × n_vocab float32: about 300 MiB with Qwen's 151,936-token vocabulary). Measured on the
0.5B model with a 2 GiB cap, memory grew by ~310 MiB per cached conversation with no plateau. Here
every byte an entry holds counts, so `--cache_size` bounds the real memory.
"""

from __future__ import annotations

import llama_cpp
from llama_cpp.llama_cache import LlamaRAMCache


class BoundedRAMCache(LlamaRAMCache):
    """LlamaRAMCache whose size is what its entries really hold (KV state, logits, token ids)."""

    @property
    def cache_size(self) -> int:
        return sum(
            state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes
            for state in self.cache_state.values()
        )


def main() -> None:
    # llama_cpp.server builds its cache through this module attribute when the model loads.
    llama_cpp.LlamaRAMCache = BoundedRAMCache  # type: ignore[attr-defined]
    from llama_cpp.server.__main__ import main as serve

    serve()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
