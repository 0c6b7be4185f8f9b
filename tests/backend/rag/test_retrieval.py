"""Hybrid retrieval: rank fusion, the full-text and dense sides, access, reranking, real MiniLM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from backend.errors import ModelError
from backend.rag.embedding import Embedder, Vectors
from backend.rag.fulltext import FullText
from backend.rag.records import KnowledgeBase
from backend.rag.retrieval import FlagReranker, Fused, Reranker, Retriever, fuse
from backend.rag.store import KnowledgeStore
from tests.backend.rag.seed import (
    ADMIN,
    DIM,
    OWNER,
    STRANGER,
    axis,
    indexed,
    open_store,
    scratch_database,
    truncate,
)

PASSAGES = [
    "The refund policy allows customers to return products within 30 days for a full refund.",
    "Our office is closed on public holidays; support replies on the next working day.",
    "To reset your password, open the login page and click the forgotten password link.",
    "Employees accrue fifteen days of paid annual leave per year, requested in the HR portal.",
    "The data center has redundant power supplies and diesel generators against outages.",
]


class _FixedEmbedder:
    """Embeds every text as axis 0: the dense side then ranks chunks by their stored vector."""

    model_name = "fixed"
    dim = DIM

    def embed(self, texts: Sequence[str]) -> Vectors:
        return np.stack([axis(0) for _ in texts])

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class _LengthReranker:
    """Prefers shorter texts."""

    def rerank(self, query: str, texts: Sequence[str]) -> list[float]:
        return [1.0 / len(text) for text in texts]


@pytest.fixture(scope="module")
def fulltext(tmp_path_factory: pytest.TempPathFactory) -> FullText:
    return FullText.create(cache_dir=tmp_path_factory.mktemp("jieba"))


@pytest.fixture(scope="module")
async def db_url(database_url: str) -> AsyncIterator[str]:
    async with scratch_database(database_url) as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[KnowledgeStore]:
    await truncate(db_url)
    async with open_store(db_url) as store:
        yield store


@pytest.fixture
async def policies(store: KnowledgeStore, fulltext: FullText) -> KnowledgeBase:
    """Four chunks; the dense side ranks them in stored order, so the 报销 chunk comes last."""
    kb = await store.create_kb("policies", principal=OWNER)
    texts = ["年假 每年 十五 天", "加班 需要 审批", "差旅 标准 说明", "报销 须 附 发票"]
    vectors = np.stack([axis(0) + 0.1 * axis(1), axis(0) + 0.2 * axis(1), axis(2), axis(3)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    search_texts = [fulltext.index_text(text) for text in texts]
    await indexed(store, kb, "policies.txt", texts, vectors=vectors, search_texts=search_texts)
    return kb


def _retriever(
    store: KnowledgeStore,
    fulltext: FullText,
    embedder: Embedder | None = None,
    *,
    reranker: Reranker | None = None,
) -> Retriever:
    return Retriever(
        store, embedder or _FixedEmbedder(), fulltext, candidates=10, rrf_k=60, ef_search=40,
        reranker=reranker,
    )  # fmt: skip


# Fusion


def test_fuse_sums_reciprocal_ranks() -> None:
    fused = fuse([10, 20, 30], [30, 40], rrf_k=1)
    assert [(f.chunk_id, round(f.score, 4)) for f in fused] == [
        (30, 0.75), (10, 0.5), (20, 0.3333), (40, 0.3333),
    ]  # fmt: skip


def test_fuse_records_both_ranks() -> None:
    fused = {f.chunk_id: f for f in fuse([10, 20, 30], [30, 40], rrf_k=60)}
    assert (fused[30], fused[40].dense_rank) == (Fused(30, 1 / 63 + 1 / 61, 3, 1), None)


def test_fuse_breaks_ties_by_best_rank_then_id() -> None:
    assert [f.chunk_id for f in fuse([1, 2, 3], [3, 4, 1], rrf_k=60)] == [1, 3, 2, 4]


# Retrieve


async def test_chinese_keyword_found_by_full_text_alone(
    store: KnowledgeStore, fulltext: FullText, policies: KnowledgeBase
) -> None:
    [hit] = await _retriever(store, fulltext).retrieve("报销要什么？", principal=STRANGER, top_k=1)
    assert (hit.text, hit.text_rank, hit.dense_rank) == ("报销 须 附 发票", 1, 4)


async def test_dense_side_alone_without_keywords(
    store: KnowledgeStore, fulltext: FullText, policies: KnowledgeBase
) -> None:
    hits = await _retriever(store, fulltext).retrieve("什么？", principal=STRANGER, top_k=2)
    assert [(h.text, h.text_rank) for h in hits] == [
        ("年假 每年 十五 天", None),
        ("加班 需要 审批", None),
    ]


@pytest.mark.parametrize("query", ["", "   ", "\n"])
async def test_blank_query_finds_nothing(
    store: KnowledgeStore, fulltext: FullText, policies: KnowledgeBase, query: str
) -> None:
    assert await _retriever(store, fulltext).retrieve(query, principal=ADMIN, top_k=3) == []


async def test_empty_kb_list_finds_nothing(
    store: KnowledgeStore, fulltext: FullText, policies: KnowledgeBase
) -> None:
    assert (
        await _retriever(store, fulltext).retrieve("报销", principal=ADMIN, kbs=[], top_k=3) == []
    )


async def test_no_readable_kb_finds_nothing(store: KnowledgeStore, fulltext: FullText) -> None:
    kb = await store.create_kb("secret", principal=OWNER, public=False)
    await indexed(store, kb, "s.txt", ["报销 机密"], search_texts=["报销 机密"])
    assert await _retriever(store, fulltext).retrieve("报销", principal=STRANGER, top_k=3) == []


async def test_hidden_chunks_never_returned(
    store: KnowledgeStore, fulltext: FullText, policies: KnowledgeBase
) -> None:
    kb = await store.create_kb("secret", principal=OWNER, public=False)
    await indexed(store, kb, "s.txt", ["报销 机密"], vectors=axis(0)[None, :])
    hits = await _retriever(store, fulltext).retrieve("报销", principal=STRANGER, top_k=10)
    assert {hit.kb for hit in hits} == {"policies"}


async def test_hits_name_their_source(
    store: KnowledgeStore, fulltext: FullText, policies: KnowledgeBase
) -> None:
    [hit] = await _retriever(store, fulltext).retrieve("报销", principal=OWNER, top_k=1)
    assert (hit.kb, hit.document_name, hit.index) == ("policies", "policies.txt", 3)


async def test_reranker_reorders(
    store: KnowledgeStore, fulltext: FullText, policies: KnowledgeBase
) -> None:
    retriever = _retriever(store, fulltext, reranker=_LengthReranker())
    hits = await retriever.retrieve("年假 加班 差旅 报销", principal=ADMIN, top_k=4)
    assert [len(hit.text) for hit in hits] == sorted(len(hit.text) for hit in hits)


async def test_reranker_score_replaces_fused_score(
    store: KnowledgeStore, fulltext: FullText, policies: KnowledgeBase
) -> None:
    retriever = _retriever(store, fulltext, reranker=_LengthReranker())
    [hit] = await retriever.retrieve("加班", principal=ADMIN, top_k=1)
    assert hit.score == pytest.approx(1.0 / len(hit.text))


def test_flag_reranker_loads_nothing_until_used() -> None:
    assert FlagReranker("/nonexistent/reranker").rerank("q", []) == []


def test_flag_reranker_unloadable_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        FlagReranker(str(tmp_path)).rerank("q", ["text"])


# End to end with the real MiniLM embedder


@pytest.fixture
async def minilm_store(database: str) -> AsyncIterator[KnowledgeStore]:
    async with open_store(database, dim=384, model="all-MiniLM-L6-v2") as store:
        yield store


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("Can I get my money back after buying something?", 0),
        ("I cannot remember my password", 2),
        ("How much vacation do staff get?", 3),
        ("What happens when the electricity fails?", 4),
    ],
)
async def test_minilm_finds_relevant_passage_first(
    minilm_store: KnowledgeStore, fulltext: FullText, embedder: Embedder, query: str, expected: int
) -> None:
    kb = await minilm_store.create_kb("handbook", principal=OWNER)
    vectors = embedder.embed(PASSAGES)
    search_texts = [fulltext.index_text(text) for text in PASSAGES]
    await indexed(
        minilm_store, kb, "handbook.md", PASSAGES, vectors=vectors, search_texts=search_texts
    )
    hits = await _retriever(minilm_store, fulltext, embedder).retrieve(
        query, principal=STRANGER, top_k=3
    )
    assert hits[0].text == PASSAGES[expected]
