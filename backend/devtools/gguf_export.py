"""Write Qwen2-architecture GGUF files from numpy weights, and quantize them.

Weights are keyed by their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...) so the
same arrays can also be saved as safetensors for transformers; `write_gguf` maps them to llama.cpp's
tensor names. Embeddings are tied (no `lm_head` / `output` tensor), as in Qwen2.5-0.5B.

Needs the `cpu` extra (`gguf`, `numpy`; `llama-cpp-python` for `quantize_gguf`). Importing this
module does no I/O and does not load llama.cpp.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import numpy.typing as npt
from gguf import GGUFWriter, LlamaFileType

from backend.errors import ModelError

log = logging.getLogger(__name__)

WEIGHT_STD = 0.02
"""Standard deviation of the random matrices: small enough that activations stay finite."""


@dataclass(frozen=True)
class Qwen2Shape:
    """The hyper-parameters of a Qwen2 decoder; `max_position` is the context length in tokens."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int
    rope_theta: float
    rms_eps: float

    TINY: ClassVar[Qwen2Shape]
    """hidden 64, 2 layers, vocab 4096: loads and generates in well under a second."""
    QWEN2_5_0_5B: ClassVar[Qwen2Shape]
    """Qwen2.5-0.5B(-Instruct): 494M parameters, tied embeddings."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"inconsistent head counts in {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.num_kv_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor name -> numpy shape (out_features, in_features) of every weight."""
        h, kv, ff = self.hidden_size, self.kv_dim, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (ff, h),
                p + "mlp.up_proj.weight": (ff, h),
                p + "mlp.down_proj.weight": (h, ff),
            }
        shapes["model.norm.weight"] = (h,)
        return shapes


Qwen2Shape.TINY = Qwen2Shape(
    name="tiny",
    vocab_size=4096,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=256,
    max_position=4096,
    rope_theta=1e6,
    rms_eps=1e-6,
)
Qwen2Shape.QWEN2_5_0_5B = Qwen2Shape(
    name="qwen2.5-0.5b",
    vocab_size=151936,
    hidden_size=896,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    intermediate_size=4864,
    max_position=32768,
    rope_theta=1e6,
    rms_eps=1e-6,
)


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary as llama.cpp's `gpt2` tokenizer reads it.

    `tokens[i]` is token id i in byte-level form; `token_types` are gguf TokenType values (1 normal,
    3 control); `merges` are `"a b"` strings in rank order.
    """

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str


class WeightType(enum.StrEnum):
    """How the matrices are stored in a freshly written GGUF (1-D tensors are always f32)."""

    F16 = "f16"
    F32 = "f32"


class Quantization(enum.StrEnum):
    """llama.cpp quantization presets `quantize_gguf` accepts."""

    Q4_K_M = "q4_k_m"
    Q5_K_M = "q5_k_m"
    Q8_0 = "q8_0"


_FTYPES = {Quantization.Q4_K_M: 15, Quantization.Q5_K_M: 17, Quantization.Q8_0: 7}
"""llama_ftype values (LLAMA_FTYPE_MOSTLY_*), stable across llama.cpp releases."""


def random_weights(shape: Qwen2Shape, *, seed: int) -> dict[str, npt.NDArray[np.float32]]:
    """Seeded random weights, Hugging Face names -> float32 arrays.

    Matrices and biases are normal(0, WEIGHT_STD) rounded through float16, so an f16 GGUF holds
    exactly the same values; norm weights are ones. Each tensor has its own random stream, so the
    result depends only on `shape` and `seed`. For Qwen2.5-0.5B this takes ~2 GB of memory.
    """
    weights: dict[str, npt.NDArray[np.float32]] = {}
    for index, (name, dims) in enumerate(shape.tensor_shapes().items()):
        if name.endswith("norm.weight"):
            weights[name] = np.ones(dims, dtype=np.float32)
            continue
        rng = np.random.default_rng([seed, index])
        values = rng.standard_normal(dims, dtype=np.float32)
        values *= WEIGHT_STD
        weights[name] = values.astype(np.float16).astype(np.float32)
    return weights


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Qwen2 tensor name; raises ValueError if unknown."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        raise ValueError(f"not a Qwen2 tensor name: {hf_name}")
    block, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    if module not in names:
        raise ValueError(f"not a Qwen2 tensor name: {hf_name}")
    return f"blk.{block}.{names[module]}.{kind}"


def write_gguf(
    path: Path,
    *,
    shape: Qwen2Shape,
    vocab: Vocab,
    weights: Mapping[str, npt.NDArray[np.float32]],
    weight_type: WeightType = WeightType.F16,
) -> Path:
    """Write a Qwen2 GGUF to `path` atomically (temp file + rename) and return `path`.

    `weights` must hold exactly `shape.tensor_shapes()`; the vocabulary must have `shape.vocab_size`
    tokens (llama.cpp checks it against the embedding rows). Raises ValueError on a mismatch.
    """
    _check_inputs(shape, vocab, weights)
    matrix_dtype = np.float16 if weight_type is WeightType.F16 else np.float32
    with _atomic_target(path) as tmp:
        writer = GGUFWriter(tmp, "qwen2")
        writer.add_name(f"qwen-stack random {shape.name}")
        writer.add_context_length(shape.max_position)
        writer.add_embedding_length(shape.hidden_size)
        writer.add_block_count(shape.num_layers)
        writer.add_feed_forward_length(shape.intermediate_size)
        writer.add_head_count(shape.num_heads)
        writer.add_head_count_kv(shape.num_kv_heads)
        writer.add_rope_freq_base(shape.rope_theta)
        writer.add_layer_norm_rms_eps(shape.rms_eps)
        file_type = LlamaFileType.MOSTLY_F16 if weight_type is WeightType.F16 else 0
        writer.add_file_type(int(file_type))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(list(vocab.tokens))
        writer.add_token_types(list(vocab.token_types))
        writer.add_token_merges(list(vocab.merges))
        writer.add_bos_token_id(vocab.bos_id)
        writer.add_eos_token_id(vocab.eos_id)
        writer.add_pad_token_id(vocab.pad_id)
        writer.add_add_bos_token(False)
        writer.add_chat_template(vocab.chat_template)
        for hf_name, array in weights.items():
            stored = array.astype(matrix_dtype) if array.ndim == 2 else array.astype(np.float32)
            writer.add_tensor(gguf_tensor_name(hf_name), stored)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("wrote %s (%s, %s)", path.name, shape.name, weight_type)
    return path


def quantize_gguf(
    source: Path,
    target: Path,
    *,
    quantization: Quantization = Quantization.Q4_K_M,
    n_threads: int = 0,
) -> Path:
    """Quantize `source` into `target` with llama.cpp (atomically) and return `target`.

    K-quants need rows that are multiples of 256; llama.cpp falls back per tensor to a legacy type
    (q5_0 / q8_0 ...) where they are not, as for Qwen2.5-0.5B's 896-wide rows and the tiny model's
    64-wide rows, so every shape here quantizes. `n_threads` 0 means all cores.
    Raises ModelError if llama.cpp reports a failure.
    """
    import llama_cpp  # loads the llama.cpp shared library: only when asked to

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[quantization]
    params.nthread = n_threads
    with _atomic_target(target) as tmp:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0:
            raise ModelError(f"llama.cpp could not quantize {source.name} to {quantization}")
    log.info("quantized %s -> %s (%s)", source.name, target.name, quantization)
    return target


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` on success, delete it on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_inputs(
    shape: Qwen2Shape, vocab: Vocab, weights: Mapping[str, npt.NDArray[np.float32]]
) -> None:
    if len(vocab.tokens) != shape.vocab_size or len(vocab.token_types) != shape.vocab_size:
        raise ValueError(
            f"vocabulary has {len(vocab.tokens)} tokens, the embedding {shape.vocab_size} rows"
        )
    expected = shape.tensor_shapes()
    if set(weights) != set(expected):
        missing, extra = set(expected) - set(weights), set(weights) - set(expected)
        raise ValueError(f"weights do not match {shape.name}: missing {missing}, extra {extra}")
    for name, dims in expected.items():
        if weights[name].shape != dims:
            raise ValueError(f"{name} has shape {weights[name].shape}, expected {dims}")
