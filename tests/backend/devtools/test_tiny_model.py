"""The tiny model loads and chats in llama.cpp, tokenizes Chinese, and builds deterministically."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from backend.devtools.tiny_model import build_tiny_model, build_vocab

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_llm(tiny_gguf: Path) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, verbose=False)
    yield llm
    llm.close()


def test_chat_completion_in_chinese(tiny_llm: llama_cpp.Llama) -> None:
    out = tiny_llm.create_chat_completion(
        messages=[{"role": "user", "content": "你好，请介绍一下北京。"}], max_tokens=8
    )
    assert isinstance(out, dict)
    assert out["choices"][0]["finish_reason"] in {"stop", "length"}


def test_chinese_round_trip(tiny_llm: llama_cpp.Llama) -> None:
    text = "通义千问是一个大模型，今天北京天气怎么样？2024年"
    tokens = tiny_llm.tokenize(text.encode(), add_bos=False)
    assert tiny_llm.detokenize(tokens).decode() == text


def test_chinese_merges_bytes(tiny_llm: llama_cpp.Llama) -> None:
    text = "我们今天学习人工智能。"
    assert len(tiny_llm.tokenize(text.encode(), add_bos=False)) < len(text)


def test_chatml_markers_are_single_tokens(tiny_llm: llama_cpp.Llama) -> None:
    tokens = tiny_llm.tokenize(b"<|im_start|>user\n<|im_end|>\n", add_bos=False, special=True)
    assert len(tokens) == 5  # <|im_start|> user \n <|im_end|> \n


def test_build_is_deterministic(tmp_path: Path, tiny_gguf: Path) -> None:
    rebuilt = build_tiny_model(tmp_path)
    assert rebuilt.name == tiny_gguf.name
    assert rebuilt.read_bytes() == tiny_gguf.read_bytes()


def test_existing_file_is_reused(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path).stat()
    second = build_tiny_model(tmp_path).stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_seed_changes_the_file(tmp_path: Path, tiny_gguf: Path) -> None:
    assert build_tiny_model(tmp_path, seed=1).name != tiny_gguf.name


def test_vocab_padded_to_embedding_rows() -> None:
    vocab = build_vocab(5000)
    assert len(vocab.tokens) == len(set(vocab.tokens)) == len(vocab.token_types) == 5000
    assert vocab.token_types[-1] == 1  # fillers are normal tokens


def test_failed_build_leaves_no_file(tmp_path: Path) -> None:
    # The child may write at most 64 KiB per file, so the ~1 MB model fails midway (EFBIG).
    child = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from backend.devtools.tiny_model import build_tiny_model\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "build_tiny_model(Path(sys.argv[1]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert "File too large" in result.stderr
    assert list(tmp_path.iterdir()) == []
