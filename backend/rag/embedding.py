"""Text embeddings: the `Embedder` interface and its FlagEmbedding implementation.

`load_embedder(rag, engine=..., cache_dir=...)` resolves `rag.embedding_model` (a local folder, or a
hub repo downloaded on first use into `cache_dir` from Hugging Face or ModelScope as
`engine.source` says) and loads it on the CPU. Importing this module loads nothing; torch and
FlagEmbedding are imported when a model is loaded.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, ValidationError

from backend.config import (
    EmbedderKind,
    EmbeddingPrecision,
    EngineSettings,
    ModelSource,
    RagSettings,
)
from backend.errors import EmbeddingMismatch, ModelDownloadError, ModelError
from backend.serving.models import READ_TIMEOUT_S, download_file

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]

LOCAL_EMBEDDER_HINT = (
    "To run without a download, set QWEN_RAG__EMBEDDING_MODEL to a local folder that holds the "
    "model (config.json, tokenizer files and weights)."
)
# Files of a hub repo the embedder never reads (bge-m3 ships a 2 GB ONNX copy and images).
IGNORED_FILES = ("onnx/*", "*.onnx", "imgs/*", "*.jpg", "*.png", "*.h5", "*.msgpack", "*.ot")
_COMPLETE_MARKER = ".download-complete"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PROBE_TEXT = "dimension probe 维度检查"


class Embedder(Protocol):
    """Turns texts into unit-length vectors; `count_tokens` measures text in the model's tokens."""

    @property
    def model_name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """float32 array of shape (len(texts), dim) with L2-normalized rows; (0, dim) for none."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the model's tokenizer, without special tokens."""
        ...


class FlagEmbedder:
    """An `Embedder` over FlagEmbedding on the CPU.

    `kind` bge-m3 uses BGEM3FlagModel's dense output; `flag` uses FlagModel with `pooling` (`cls` or
    `mean`). Texts longer than `max_length` tokens are truncated; `batch_size` texts go through the
    model at once. No progress bars are drawn.

    `precision` bfloat16 runs the matrix products in bfloat16 under torch's CPU autocast, with the
    linear layers' weights stored in bfloat16 once (else autocast casts them again in every
    batch, ~7% of the time); embeddings, norms, softmax and pooling stay float32. Where the CPU
    multiplies bfloat16 natively (AVX512-BF16, AMX) that embeds ~1.8x faster than float32, and the
    vectors keep a cosine above 0.9999 with the float32 ones (tests/backend/rag/test_embedding.py).
    `auto` picks it on such CPUs and float32 elsewhere (emulated bfloat16 would be slower);
    `precision` says which ran.

    Batching: a call's texts are tokenized once, sorted by token count, longest first, and cut
    into batches of at most `batch_size` that also end where a text is shorter than
    SHORT_RATIO of the batch's first (longest) one, so a document's few short chunks (section
    ends) do not pad up to its long ones: ~96% of the computed positions are real tokens on the
    bench's documents, against ~84% for fixed batches sorted by characters.

    Thread-safe: `embed` calls are serialized by a lock (the model and its tokenizer are not safe to
    share between threads), and `count_tokens` uses its own copy of the tokenizer under a second
    lock, so counting never waits for a running embedding. Callers on an event loop run both through
    `asyncio.to_thread`. Loading takes seconds (torch import) and is blocking.

    Raises ModelError when the folder does not hold a loadable model, EmbeddingMismatch when its
    vectors are not `dim` long.
    """

    def __init__(
        self,
        path: Path,
        *,
        kind: EmbedderKind,
        dim: int,
        pooling: str = "cls",
        batch_size: int = 16,
        max_length: int = 512,
        precision: EmbeddingPrecision = EmbeddingPrecision.FLOAT32,
        model_name: str | None = None,
    ) -> None:
        self._model_name = model_name or path.name
        self.precision = resolve_precision(precision)
        self._dim = dim
        self._kind = kind
        self._batch_size = batch_size
        self._max_length = max_length
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._model, self._tokenizer = _load(path, kind=kind, pooling=pooling)
        if self.precision is EmbeddingPrecision.BFLOAT16:
            _linear_weights_to_bfloat16(self._model.model)
        self.embed([_PROBE_TEXT])
        logger.info(
            "embedder %s loaded (%s, %d dimensions, %s)",
            self._model_name,
            kind,
            dim,
            self.precision,
        )

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> Vectors:
        """See `Embedder.embed`. Raises EmbeddingMismatch when the model's width is not `dim`."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        tokenized = self._model.tokenizer(
            list(texts), truncation=True, max_length=self._max_length, verbose=False
        )
        ids = tokenized["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        with self._lock:
            parts = [
                self._forward(tokenized, batch) for batch in _batches(order, ids, self._batch_size)
            ]
        by_length = np.concatenate(parts, axis=0)
        vectors = np.empty_like(by_length)
        vectors[order] = by_length
        if vectors.shape[1] != self._dim:
            raise EmbeddingMismatch(
                f"embedding model {self._model_name} gives {vectors.shape[1]}-dimensional vectors "
                f"but {self._dim} are configured; set QWEN_RAG__EMBEDDING_DIM to match the model "
                "(a store indexed with another dimension must be rebuilt)"
            )
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        normalized: Vectors = vectors / np.maximum(norms, np.float32(1e-12))
        return normalized

    def _forward(self, tokenized: Any, batch: list[int]) -> npt.NDArray[np.float32]:
        """Rows `batch` of `tokenized` through the model, padded to the longest: what
        FlagEmbedding's `encode` computes per batch.

        `encode` is not called because it runs its first batch twice (a memory probe) and draws
        tqdm bars on stderr; for the one-batch calls of ingestion and queries that doubles the CPU
        time. The tests check that the vectors equal `encode`'s.
        """
        import torch

        flag = self._model
        features = {key: [values[i] for i in batch] for key, values in tokenized.items()}
        inputs = flag.tokenizer.pad(features, padding=True, return_tensors="pt")
        autocast = torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=self.precision is EmbeddingPrecision.BFLOAT16
        )
        with torch.inference_mode(), autocast:
            if self._kind is EmbedderKind.BGE_M3:
                dense = flag.model(
                    inputs, return_dense=True, return_sparse=False, return_colbert_vecs=False
                )["dense_vecs"]
            else:
                hidden = flag.model(**inputs, return_dict=True).last_hidden_state
                dense = flag.pooling(hidden, inputs["attention_mask"])
        result: npt.NDArray[np.float32] = dense.float().numpy()
        return result

    def count_tokens(self, text: str) -> int:
        """See `Embedder.count_tokens`. Counts the whole text (no truncation)."""
        with self._count_lock:
            encoded = self._tokenizer(text, add_special_tokens=False, verbose=False)
        return len(encoded["input_ids"])


SHORT_RATIO = 0.6  # a text shorter than this share of its batch's longest starts a new batch


def _batches(order: list[int], ids: list[list[int]], size: int) -> list[list[int]]:
    """`order` (indices by token count, longest first) cut into batches of at most `size` that
    end early where a text has fewer than SHORT_RATIO times the batch's first one's tokens."""
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch is None or len(batch) == size or len(ids[i]) < SHORT_RATIO * len(ids[batch[0]]):
            batches.append([i])
        else:
            batch.append(i)
    return batches


def _linear_weights_to_bfloat16(model: Any) -> None:
    """Store the weights of `model`'s linear layers in bfloat16 (autocast then skips the casts)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)


def resolve_precision(precision: EmbeddingPrecision) -> EmbeddingPrecision:
    """`precision`, with AUTO resolved for this CPU: BFLOAT16 when it has AVX512-BF16 or AMX
    instructions (torch's own probes), FLOAT32 otherwise."""
    if precision is not EmbeddingPrecision.AUTO:
        return precision
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return EmbeddingPrecision.BFLOAT16 if native else EmbeddingPrecision.FLOAT32


def _load(path: Path, *, kind: EmbedderKind, pooling: str) -> tuple[Any, Any]:
    """The FlagEmbedding model in `path` and a separate tokenizer for counting."""
    from FlagEmbedding import BGEM3FlagModel, FlagModel
    from transformers import AutoTokenizer

    options: dict[str, Any] = {"normalize_embeddings": True, "use_fp16": False, "devices": "cpu"}
    try:
        if kind is EmbedderKind.BGE_M3:
            model = BGEM3FlagModel(str(path), **options)
        else:
            model = FlagModel(str(path), pooling_method=pooling, **options)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model.model.float().to("cpu").eval()
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"could not load the embedding model in {path}: {exc}. {LOCAL_EMBEDDER_HINT}"
        ) from exc
    return model, tokenizer


def load_embedder(rag: RagSettings, *, engine: EngineSettings, cache_dir: Path) -> FlagEmbedder:
    """The embedder `rag` configures, downloading its model into `cache_dir` on first use.

    Blocking (seconds; a download can take minutes). Raises ModelError, ModelDownloadError,
    EmbeddingMismatch.
    """
    folder = resolve_embedding_model(rag.embedding_model, engine=engine, cache_dir=cache_dir)
    return FlagEmbedder(
        folder,
        kind=rag.embedder,
        dim=rag.embedding_dim,
        pooling=rag.embedding_pooling,
        batch_size=rag.embedding_batch,
        max_length=rag.embedding_max_length,
        precision=rag.embedding_precision,
        model_name=rag.embedding_model,
    )


def resolve_embedding_model(name: str, *, engine: EngineSettings, cache_dir: Path) -> Path:
    """The local folder of embedding model `name`: `name` itself when it is a folder, else the hub
    repo `name` under `cache_dir`, downloaded first when not complete there.

    A download goes to `cache_dir/<owner>--<repo>` (resumable) and is marked complete at the end, so
    later calls touch no network. Raises ModelError when `name` is neither a folder nor a repo id,
    ModelDownloadError when the download fails (offline, refused, unknown repo).
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if not _REPO_ID.fullmatch(name) or ".." in name:
        raise ModelError(
            f"embedding model folder {name} does not exist and is not a hub repo id; "
            f"{LOCAL_EMBEDDER_HINT}"
        )
    dest = cache_dir / name.replace("/", "--")
    if (dest / _COMPLETE_MARKER).is_file():
        return dest
    logger.info("embedding model %s not cached; downloading from %s", name, engine.source)
    if engine.source is ModelSource.MODELSCOPE:
        _download_modelscope(name, dest, engine=engine)
    else:
        _download_huggingface(name, dest, engine=engine)
    (dest / _COMPLETE_MARKER).write_text(f"{engine.source} {name}\n", encoding="utf-8")
    logger.info("embedding model %s downloaded", name)
    return dest


def _download_huggingface(repo: str, dest: Path, *, engine: EngineSettings) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot_download(
            repo,
            local_dir=dest,
            endpoint=engine.hf_endpoint,
            etag_timeout=engine.download_timeout_s,
            ignore_patterns=list(IGNORED_FILES),
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx.HTTPError, OSError) as exc:
        raise ModelDownloadError(
            f"could not download embedding model {repo} from Hugging Face ({engine.hf_endpoint}): "
            f"{type(exc).__name__}. {LOCAL_EMBEDDER_HINT}"
        ) from exc


class _ModelScopeFile(BaseModel):
    path: str = Field(alias="Path")
    type: str = Field(alias="Type")


class _ModelScopeFiles(BaseModel):
    files: list[_ModelScopeFile] = Field(alias="Files")


class _ModelScopeListing(BaseModel):
    data: _ModelScopeFiles = Field(alias="Data")


def _download_modelscope(repo: str, dest: Path, *, engine: EngineSettings) -> None:
    base = engine.modelscope_endpoint.rstrip("/")
    listing_url = f"{base}/api/v1/models/{quote(repo, safe='/')}/repo/files"
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=engine.download_timeout_s)
    failure = f"could not download embedding model {repo} from ModelScope ({base})"
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            response = client.get(listing_url, params={"Revision": "master", "Recursive": "true"})
            response.raise_for_status()
            listing = _ModelScopeListing.model_validate_json(response.content)
    except (httpx.HTTPError, ValidationError) as exc:
        raise ModelDownloadError(f"{failure}: {type(exc).__name__}. {LOCAL_EMBEDDER_HINT}") from exc
    paths = [entry.path for entry in listing.data.files if entry.type != "tree"]
    wanted = [p for p in paths if not any(fnmatch.fnmatch(p, pat) for pat in IGNORED_FILES)]
    if not wanted:
        raise ModelDownloadError(f"{failure}: the repo lists no files. {LOCAL_EMBEDDER_HINT}")
    for relative in wanted:
        parts = Path(relative).parts
        if Path(relative).is_absolute() or ".." in parts or not parts:
            raise ModelDownloadError(f"{failure}: refused file path {relative!r}")
        url = f"{base}/models/{quote(repo, safe='/')}/resolve/master/{quote(relative, safe='/')}"
        try:
            download_file(url, dest.joinpath(*parts), connect_timeout_s=engine.download_timeout_s)
        except ModelDownloadError as exc:
            raise ModelDownloadError(f"{failure}: {relative}. {LOCAL_EMBEDDER_HINT}") from exc
