from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from transformers import AutoTokenizer

from backend.config import (
    EmbedderKind,
    EmbeddingPrecision,
    EngineSettings,
    ModelSource,
    RagSettings,
)
from backend.errors import EmbeddingMismatch, ModelDownloadError, ModelError
from backend.rag.embedding import (
    FlagEmbedder,
    load_embedder,
    resolve_embedding_model,
    resolve_precision,
)

REPO = "sentence-transformers/all-MiniLM-L6-v2"
PASSWORD_QUESTION = "How do I reset my password?"
PASSWORD_PASSAGE = (
    "To reset your password, open Settings, choose Security and click 'Forgot password'; "
    "a reset link is sent to your email."
)
VACATION_PASSAGE = (
    "Employees receive fifteen days of paid vacation per year. Request leave through the HR "
    "portal at least two weeks in advance."
)


@dataclass
class FakeModelScope:
    """A loopback server answering ModelScope's file listing and resolve URLs from a folder."""

    url: str
    requested: list[str] = field(default_factory=list)


@pytest.fixture
def fake_modelscope(minilm_path: Path) -> Iterator[FakeModelScope]:
    files = sorted(
        p.relative_to(minilm_path).as_posix() for p in minilm_path.rglob("*") if p.is_file()
    )
    listing = [{"Path": f, "Name": f.rsplit("/", 1)[-1], "Type": "blob"} for f in files]
    listing += [{"Path": "1_Pooling", "Type": "tree"}, {"Path": "onnx/model.onnx", "Type": "blob"}]
    state = FakeModelScope(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            if path == f"/api/v1/models/{REPO}/repo/files":
                body = json.dumps({"Code": 200, "Data": {"Files": listing}}).encode()
            elif path.startswith(prefix := f"/models/{REPO}/resolve/master/"):
                name = path.removeprefix(prefix)
                state.requested.append(name)
                if name not in files:
                    self.send_error(404)
                    return
                body = (minilm_path / name).read_bytes()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def closed_endpoint() -> str:
    """A loopback URL where nothing listens (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_vectors_are_unit_float32_rows(embedder: FlagEmbedder) -> None:
    vectors = embedder.embed(["hello world", "知识库", PASSWORD_PASSAGE])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384) == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_no_rows(embedder: FlagEmbedder) -> None:
    vectors = embedder.embed([])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_question_is_closest_to_its_answer(embedder: FlagEmbedder) -> None:
    question, password, vacation = embedder.embed(
        [PASSWORD_QUESTION, PASSWORD_PASSAGE, VACATION_PASSAGE]
    )
    assert float(question @ password) > float(question @ vacation) + 0.1


def test_batches_give_the_same_vectors(embedder: FlagEmbedder) -> None:
    texts = [f"sentence number {i} about topic {i % 5}" for i in range(40)]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts[:3]])
    np.testing.assert_allclose(together[:3], alone, atol=1e-5)


def test_count_tokens_matches_the_tokenizer(embedder: FlagEmbedder, minilm_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    long_text = "retrieval augmented generation " * 400
    for text in ["How do I reset my password?", "知识库问答", long_text]:
        expected = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        assert embedder.count_tokens(text) == expected
    assert embedder.count_tokens(long_text) == 1200
    assert embedder.count_tokens("") == 0


async def test_concurrent_calls_from_threads(embedder: FlagEmbedder) -> None:
    texts = [PASSWORD_QUESTION, PASSWORD_PASSAGE, VACATION_PASSAGE]
    expected = embedder.embed(texts)
    results = await asyncio.gather(
        *(asyncio.to_thread(embedder.embed, texts) for _ in range(4)),
        *(asyncio.to_thread(embedder.count_tokens, VACATION_PASSAGE) for _ in range(4)),
    )
    for vectors in results[:4]:
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert set(results[4:]) == {embedder.count_tokens(VACATION_PASSAGE)}


@pytest.fixture(scope="module")
def float32_embedder(minilm_path: Path) -> FlagEmbedder:
    return FlagEmbedder(
        minilm_path, kind=EmbedderKind.FLAG, dim=384, pooling="mean", max_length=256,
        precision=EmbeddingPrecision.FLOAT32,
    )  # fmt: skip


def test_vectors_equal_flag_embeddings_encode(
    float32_embedder: FlagEmbedder, minilm_path: Path
) -> None:
    from FlagEmbedding import FlagModel

    texts = [PASSWORD_QUESTION, PASSWORD_PASSAGE, VACATION_PASSAGE, "short"]
    reference = FlagModel(
        str(minilm_path), pooling_method="mean", use_fp16=False, devices="cpu"
    ).encode(texts, batch_size=64, max_length=256)
    assert float32_embedder.precision is EmbeddingPrecision.FLOAT32
    np.testing.assert_allclose(float32_embedder.embed(texts), reference, atol=1e-5)


def test_bfloat16_vectors_stay_within_a_cosine_of_float32(
    float32_embedder: FlagEmbedder, minilm_path: Path
) -> None:
    bf16 = FlagEmbedder(
        minilm_path, kind=EmbedderKind.FLAG, dim=384, pooling="mean", max_length=256,
        precision=EmbeddingPrecision.BFLOAT16,
    )  # fmt: skip
    texts = [PASSWORD_QUESTION, PASSWORD_PASSAGE, VACATION_PASSAGE, "short", "知识库 报销 流程"]
    texts += [f"policy {i}: employees submit receipts within {i} days" for i in range(20)]
    exact, fast = float32_embedder.embed(texts), bf16.embed(texts)
    assert bf16.precision is EmbeddingPrecision.BFLOAT16
    assert fast.dtype == np.float32
    assert not np.array_equal(exact, fast)  # bfloat16 did run
    cosines = (exact * fast).sum(axis=1)
    assert cosines.min() > 0.9999, cosines.min()
    # the nearest passage stays the nearest
    question, password, vacation = fast[:3]
    assert float(question @ password) > float(question @ vacation) + 0.1


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [
        (True, False, EmbeddingPrecision.BFLOAT16),
        (False, True, EmbeddingPrecision.BFLOAT16),
        (False, False, EmbeddingPrecision.FLOAT32),
    ],
)
def test_auto_precision_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: EmbeddingPrecision
) -> None:
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision(EmbeddingPrecision.AUTO) is expected
    for explicit in (EmbeddingPrecision.FLOAT32, EmbeddingPrecision.BFLOAT16):
        assert resolve_precision(explicit) is explicit


def test_bge_m3_kind_gives_its_dense_vectors(
    rag_settings: RagSettings, minilm_path: Path, tmp_path: Path
) -> None:
    from FlagEmbedding import BGEM3FlagModel

    settings = rag_settings.model_copy(
        update={"embedder": EmbedderKind.BGE_M3, "embedding_precision": EmbeddingPrecision.FLOAT32}
    )
    m3 = load_embedder(settings, engine=EngineSettings(), cache_dir=tmp_path)
    texts = ["hello world", PASSWORD_QUESTION, PASSWORD_PASSAGE]
    vectors = m3.embed(texts)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = BGEM3FlagModel(str(minilm_path), use_fp16=False, devices="cpu").encode(
        texts, batch_size=64, max_length=256, return_dense=True
    )["dense_vecs"]
    np.testing.assert_allclose(vectors, reference, atol=1e-5)


def test_embedding_draws_no_progress_bars(
    embedder: FlagEmbedder, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    embedder.embed([f"text {i}" for i in range(40)])
    assert capfd.readouterr().err == ""


def test_wrong_dimension_is_refused(rag_settings: RagSettings, tmp_path: Path) -> None:
    settings = rag_settings.model_copy(update={"embedding_dim": 1024})
    with pytest.raises(EmbeddingMismatch, match="QWEN_RAG__EMBEDDING_DIM"):
        load_embedder(settings, engine=EngineSettings(), cache_dir=tmp_path)


def test_local_folder_is_used_as_is(minilm_path: Path, tmp_path: Path) -> None:
    engine = EngineSettings(hf_endpoint="http://127.0.0.1:9")
    assert (
        resolve_embedding_model(str(minilm_path), engine=engine, cache_dir=tmp_path) == minilm_path
    )


def test_missing_folder_that_is_no_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="QWEN_RAG__EMBEDDING_MODEL") as caught:
        resolve_embedding_model(
            str(tmp_path / "absent"), engine=EngineSettings(), cache_dir=tmp_path
        )
    assert type(caught.value) is ModelError


def test_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="could not load"):
        FlagEmbedder(tmp_path, kind=EmbedderKind.FLAG, dim=384)


@pytest.mark.timeout(30)
def test_unreachable_huggingface(closed_endpoint: str, tmp_path: Path) -> None:
    engine = EngineSettings(hf_endpoint=closed_endpoint, download_timeout_s=2)
    with pytest.raises(ModelDownloadError, match="QWEN_RAG__EMBEDDING_MODEL"):
        resolve_embedding_model("BAAI/bge-m3", engine=engine, cache_dir=tmp_path)
    assert not (tmp_path / "BAAI--bge-m3" / ".download-complete").exists()


@pytest.mark.timeout(30)
def test_unreachable_modelscope(closed_endpoint: str, tmp_path: Path) -> None:
    engine = EngineSettings(
        source=ModelSource.MODELSCOPE, modelscope_endpoint=closed_endpoint, download_timeout_s=2
    )
    with pytest.raises(ModelDownloadError, match="QWEN_RAG__EMBEDDING_MODEL"):
        resolve_embedding_model("BAAI/bge-m3", engine=engine, cache_dir=tmp_path)


def test_modelscope_download_is_used_and_cached(
    fake_modelscope: FakeModelScope,
    rag_settings: RagSettings,
    embedder: FlagEmbedder,
    minilm_path: Path,
    tmp_path: Path,
) -> None:
    engine = EngineSettings(source=ModelSource.MODELSCOPE, modelscope_endpoint=fake_modelscope.url)
    settings = rag_settings.model_copy(update={"embedding_model": REPO})
    downloaded = load_embedder(settings, engine=engine, cache_dir=tmp_path)
    folder = tmp_path / "sentence-transformers--all-MiniLM-L6-v2"
    assert (folder / "1_Pooling" / "config.json").read_bytes() == (
        minilm_path / "1_Pooling" / "config.json"
    ).read_bytes()
    assert "onnx/model.onnx" not in fake_modelscope.requested
    assert downloaded.model_name == REPO
    np.testing.assert_allclose(
        downloaded.embed([PASSWORD_QUESTION]), embedder.embed([PASSWORD_QUESTION]), atol=1e-5
    )
    requests = len(fake_modelscope.requested)
    assert resolve_embedding_model(REPO, engine=engine, cache_dir=tmp_path) == folder
    assert len(fake_modelscope.requested) == requests


def test_batches_are_capped_and_end_before_a_much_shorter_text() -> None:
    from backend.rag.embedding import SHORT_RATIO, _batches

    lengths = [130, 128, 125, 120, 118, 60, 58, 30]
    ids = [[0] * n for n in lengths]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = _batches(order, ids, 3)
    assert batches == [[0, 1, 2], [3, 4], [5, 6], [7]]
    for batch in batches:  # every text in a batch is at least SHORT_RATIO of its first
        assert all(len(ids[i]) >= SHORT_RATIO * len(ids[batch[0]]) for i in batch)
    assert sorted(i for batch in batches for i in batch) == list(range(len(ids)))


def test_short_and_long_texts_in_one_call_equal_separate_calls(embedder: FlagEmbedder) -> None:
    long = [f"{PASSWORD_PASSAGE} {VACATION_PASSAGE} paragraph {i}" for i in range(5)]
    short = ["ok", "hello world", "知识库"]
    together = embedder.embed([*long, *short])
    np.testing.assert_allclose(together[5:], embedder.embed(short), atol=2e-3)
    np.testing.assert_allclose(together[:5], embedder.embed(long), atol=2e-3)
