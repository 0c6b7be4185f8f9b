"""GGUF writing and quantization, checked by reading the files back (gguf reader, llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from backend.devtools.gguf_export import (
    Quantization,
    Qwen2Shape,
    Vocab,
    gguf_tensor_name,
    quantize_gguf,
    random_weights,
    write_gguf,
)
from backend.errors import ModelError


def _field(reader: GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_tensor_names(tiny_gguf: Path) -> None:
    names = {tensor.name for tensor in GGUFReader(tiny_gguf).tensors}
    per_block = {
        "attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias",
        "attn_v.weight", "attn_v.bias", "attn_output.weight", "ffn_norm.weight",
        "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
    }  # fmt: skip
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{name}" for i in range(Qwen2Shape.TINY.num_layers) for name in per_block
    }
    assert names == expected


def test_hyperparameters(tiny_gguf: Path) -> None:
    reader = GGUFReader(tiny_gguf)
    shape = Qwen2Shape.TINY
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.embedding_length") == shape.hidden_size
    assert _field(reader, "qwen2.block_count") == shape.num_layers
    assert _field(reader, "qwen2.attention.head_count_kv") == shape.num_kv_heads
    assert _field(reader, "qwen2.rope.freq_base") == pytest.approx(shape.rope_theta)


def test_tokenizer_metadata(tiny_gguf: Path) -> None:
    reader = GGUFReader(tiny_gguf)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert isinstance(tokens, list) and isinstance(types, list)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert len(tokens) == Qwen2Shape.TINY.vocab_size
    assert [types[tokens.index(t)] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        3, 3, 3,
    ]  # fmt: skip
    assert tokens[int(str(_field(reader, "tokenizer.ggml.eos_token_id")))] == "<|im_end|>"


def test_merges_are_pairs(tiny_gguf: Path) -> None:
    merges = _field(GGUFReader(tiny_gguf), "tokenizer.ggml.merges")
    assert isinstance(merges, list) and merges
    assert all(len(merge.split(" ")) == 2 for merge in merges)


def test_chat_template_is_chatml(tiny_gguf: Path) -> None:
    template = _field(GGUFReader(tiny_gguf), "tokenizer.chat_template")
    assert isinstance(template, str)
    assert "<|im_start|>" in template and "add_generation_prompt" in template


def test_tensor_name_mapping() -> None:
    assert gguf_tensor_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.k_proj.bias") == "blk.0.attn_k.bias"


def test_unknown_tensor_name_rejected() -> None:
    with pytest.raises(ValueError, match="not a Qwen2 tensor"):
        gguf_tensor_name("lm_head.weight")


def test_random_weights_are_seeded() -> None:
    first = random_weights(Qwen2Shape.TINY, seed=1)
    second = random_weights(Qwen2Shape.TINY, seed=1)
    name = "model.layers.1.mlp.up_proj.weight"
    assert (first[name] == second[name]).all()
    assert (first[name] != random_weights(Qwen2Shape.TINY, seed=2)[name]).any()


def test_vocab_size_mismatch_rejected(tmp_path: Path) -> None:
    vocab = Vocab(
        tokens=("a", "b"), token_types=(1, 1), merges=(), bos_id=0, eos_id=1, pad_id=0,
        chat_template="",
    )  # fmt: skip
    shape = Qwen2Shape.TINY
    with pytest.raises(ValueError, match="vocabulary has 2 tokens"):
        write_gguf(
            tmp_path / "x.gguf", shape=shape, vocab=vocab, weights=random_weights(shape, seed=0)
        )
    assert list(tmp_path.iterdir()) == []


def test_quantize_q4_k_m(tiny_gguf: Path, tmp_path: Path) -> None:
    target = quantize_gguf(tiny_gguf, tmp_path / "q4.gguf", quantization=Quantization.Q4_K_M)
    reader = GGUFReader(target)
    assert _field(reader, "general.file_type") == 15
    kinds = {tensor.tensor_type for tensor in reader.tensors}
    assert kinds - {GGMLQuantizationType.F32, GGMLQuantizationType.F16}


def test_quantized_model_generates(tiny_gguf: Path, tmp_path: Path) -> None:
    target = quantize_gguf(tiny_gguf, tmp_path / "q4.gguf")
    llm = llama_cpp.Llama(model_path=str(target), n_ctx=128, verbose=False)
    try:
        out = llm.create_completion("你好", max_tokens=4)
    finally:
        llm.close()
    assert isinstance(out, dict)
    assert out["usage"]["completion_tokens"] >= 1


def test_quantize_failure_raises(tmp_path: Path) -> None:
    source = tmp_path / "not-a-model.gguf"
    source.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelError):
        quantize_gguf(source, tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model.gguf"]
