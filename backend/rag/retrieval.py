"""Hybrid retrieval: dense (HNSW) and full-text search, fused by reciprocal rank, optionally reranked.

    retriever = Retriever(store, embedder, fulltext, candidates=40, rrf_k=60, ef_search=64)
    hits = await retriever.retrieve("年假怎么申请", principal=p, top_k=5)

Dense search finds paraphrases; full-text search finds exact keywords, names and numbers that an
embedding blurs (and Chinese keywords the small test model cannot read at all). Each side returns
its `candidates` best chunks; a chunk's fused score is the sum over the lists it appears in of
1 / (rrf_k + rank), rank 1-based, which needs no calibration between cosine distances and
ts_rank_cd values.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from backend.auth import Principal
from backend.errors import ModelError
from backend.rag.document import Hit
from backend.rag.embedding import Embedder
from backend.rag.fulltext import FullText
from backend.rag.search import ChunkRow
from backend.rag.store import KnowledgeStore

logger = logging.getLogger(__name__)


class Reranker(Protocol):
    """Scores how well each text answers the query; higher is better. Blocking (runs in a thread)."""

    def rerank(self, query: str, texts: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True)
class Fused:
    """A chunk's place after reciprocal rank fusion; ranks are 1-based, None when absent."""

    chunk_id: int
    score: float
    dense_rank: int | None
    text_rank: int | None


def fuse(dense: Sequence[int], text: Sequence[int], *, rrf_k: int) -> list[Fused]:
    """Reciprocal rank fusion of two ranked id lists, best first. Ties go to the chunk with the
    better single rank, then the lower id, so the order is deterministic."""
    dense_ranks = {chunk_id: rank for rank, chunk_id in enumerate(dense, 1)}
    text_ranks = {chunk_id: rank for rank, chunk_id in enumerate(text, 1)}
    fused = []
    for chunk_id in dense_ranks.keys() | text_ranks.keys():
        ranks = (dense_ranks.get(chunk_id), text_ranks.get(chunk_id))
        score = sum(1.0 / (rrf_k + rank) for rank in ranks if rank is not None)
        fused.append(Fused(chunk_id, score, *ranks))
    best_rank = len(dense) + len(text) + 1
    return sorted(
        fused,
        key=lambda f: (
            -f.score,
            min(f.dense_rank or best_rank, f.text_rank or best_rank),
            f.chunk_id,
        ),
    )


class Retriever:
    """Finds the chunks that best answer a question among those the principal may read.

    `candidates`: chunks fetched by each side (and reranked, with a reranker); `rrf_k`: the fusion
    constant; `ef_search`: HNSW search breadth. Safe for concurrent calls: each uses two pool
    connections at once (dense and full text run concurrently) and the embedder in a thread.
    """

    def __init__(
        self,
        store: KnowledgeStore,
        embedder: Embedder,
        fulltext: FullText,
        *,
        candidates: int,
        rrf_k: int,
        ef_search: int,
        reranker: Reranker | None = None,
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._fulltext = fulltext
        self._candidates = candidates
        self._rrf_k = rrf_k
        self._ef_search = ef_search
        self._reranker = reranker

    async def retrieve(
        self, query: str, *, principal: Principal, kbs: Sequence[str] | None = None, top_k: int
    ) -> list[Hit]:
        """The `top_k` best hits, best first; [] for a blank query, `kbs=[]`, or when nothing
        readable matches. `kbs` narrows the search to the named knowledge bases (names the
        principal may not read match nothing). Raises psycopg errors and the embedder's and
        reranker's errors (ModelError)."""
        query = query.strip()
        if not query or top_k <= 0 or (kbs is not None and not kbs):
            return []
        async with asyncio.TaskGroup() as group:
            dense_task = group.create_task(self._dense(query, principal=principal, kbs=kbs))
            text_task = group.create_task(self._text(query, principal=principal, kbs=kbs))
        fused = fuse(dense_task.result(), text_task.result(), rrf_k=self._rrf_k)
        depth = self._candidates if self._reranker is not None else top_k
        fused = fused[:depth]
        rows = await self._store.chunks([f.chunk_id for f in fused], principal=principal)
        by_id = {f.chunk_id: f for f in fused}
        scored = [(row, by_id[row.id].score) for row in rows]
        if self._reranker is not None and scored:
            scores = await asyncio.to_thread(
                self._reranker.rerank, query, [row.text for row, _ in scored]
            )
            scored = sorted(
                ((row, score) for (row, _), score in zip(scored, scores, strict=True)),
                key=lambda pair: -pair[1],
            )
        return [_hit(row, score, by_id[row.id]) for row, score in scored[:top_k]]

    async def _dense(
        self, query: str, *, principal: Principal, kbs: Sequence[str] | None
    ) -> list[int]:
        vectors = await asyncio.to_thread(self._embedder.embed, [query])
        found = await self._store.dense(
            vectors[0], principal=principal, kbs=kbs, limit=self._candidates,
            ef_search=self._ef_search,
        )  # fmt: skip
        return [chunk_id for chunk_id, _ in found]

    async def _text(
        self, query: str, *, principal: Principal, kbs: Sequence[str] | None
    ) -> list[int]:
        terms = await asyncio.to_thread(self._fulltext.query_terms, query)
        found = await self._store.text(terms, principal=principal, kbs=kbs, limit=self._candidates)
        return [chunk_id for chunk_id, _ in found]


def _hit(row: ChunkRow, score: float, fused: Fused) -> Hit:
    return Hit(
        chunk_id=row.id, document_id=row.document_id, document_name=row.document_name,
        kb=row.kb, index=row.index, text=row.text, heading=row.heading,
        page_start=row.page_start, page_end=row.page_end, char_start=row.char_start,
        char_end=row.char_end, score=score, dense_rank=fused.dense_rank,
        text_rank=fused.text_rank,
    )  # fmt: skip


class FlagReranker:
    """A `Reranker` over FlagEmbedding's cross-encoder (e.g. BAAI/bge-reranker-v2-m3) on the CPU.

    `model` is a local folder (or a hub repo FlagEmbedding may download). Nothing is loaded until
    the first `rerank` (seconds; torch import); loading and scoring are serialized by a lock.
    Scores are normalized to 0..1. Raises ModelError when the model cannot be loaded.
    """

    def __init__(self, model: str, *, batch_size: int = 16, max_length: int = 512) -> None:
        self._model_name = model
        self._batch_size = batch_size
        self._max_length = max_length
        self._model: Any = None
        self._lock = threading.Lock()

    def rerank(self, query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        with self._lock:
            if self._model is None:
                self._model = _load_reranker(self._model_name)
            scores = self._model.compute_score(
                [(query, text) for text in texts], batch_size=self._batch_size,
                max_length=self._max_length, normalize=True,
            )  # fmt: skip
        if isinstance(scores, float | int):
            scores = [scores]
        return [float(score) for score in scores]


def _load_reranker(model: str) -> Any:
    try:
        from FlagEmbedding import FlagReranker as _Reranker  # heavy: torch, transformers

        return _Reranker(model, use_fp16=False, devices="cpu")
    except Exception as exc:
        raise ModelError(f"reranker {model} could not be loaded: {exc}") from exc
