"""Dense, full-text and chunk queries: ranking, the HNSW index, access in the SQL, hostile input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import psycopg
import pytest

from backend.auth import Principal
from backend.rag import search
from backend.rag.fulltext import FullText
from backend.rag.records import KbAccess, KnowledgeBase
from backend.rag.store import EMBEDDING_INDEX, KnowledgeStore
from backend.rag.vectors import VectorAdapters
from tests.backend.rag.seed import (
    ADMIN,
    DIM,
    GRANTED_USER,
    OTHER_KB_ADMIN,
    OWNER,
    STRANGER,
    axis,
    indexed,
    open_store,
    scratch_database,
    truncate,
    unit,
)

READERS = [ADMIN, OWNER, GRANTED_USER]
NON_READERS = [OTHER_KB_ADMIN, STRANGER]
HOSTILE = [
    "'", "''", "&", "|", "!", "!!", ":*", "a:*", "(", ")", "()", "\\", "\\'", "<->", "<2>",
    "a & b | !c", "'; DROP TABLE rag_chunks; --", "报销' | '1", "%s", "%(acl_role)s", "\x00",
    "报\x00销", ":", "*", "'报销'", " ", "",
]  # fmt: skip


@pytest.fixture(scope="module")
async def db_url(database_url: str) -> AsyncIterator[str]:
    async with scratch_database(database_url) as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[KnowledgeStore]:
    await truncate(db_url)
    async with open_store(db_url) as store:
        yield store


@pytest.fixture(scope="module")
def fulltext(tmp_path_factory: pytest.TempPathFactory) -> FullText:
    return FullText.create(cache_dir=tmp_path_factory.mktemp("jieba"))


@pytest.fixture
async def private(store: KnowledgeStore) -> KnowledgeBase:
    """OWNER's private KB (GRANTED_USER may read) with one chunk along axis 0 about 报销."""
    kb = await store.create_kb("secret", principal=OWNER, public=False)
    await store.grant("secret", GRANTED_USER.user, access=KbAccess.READ, principal=OWNER)
    await indexed(store, kb, "secret.txt", ["报销 流程 机密"], vectors=axis(0)[None, :])
    return kb


@pytest.fixture
async def public(store: KnowledgeStore) -> KnowledgeBase:
    kb = await store.create_kb("open", principal=OWNER)
    await indexed(
        store, kb, "open.txt", ["年 假 申请", "报销 发票"], vectors=np.stack([axis(1), axis(2)])
    )
    return kb


async def _texts(store: KnowledgeStore, found: list[tuple[int, float]]) -> list[str]:
    rows = await store.chunks([chunk_id for chunk_id, _ in found], principal=ADMIN)
    return [row.text for row in rows]


# Dense


async def test_dense_orders_by_distance(store: KnowledgeStore) -> None:
    kb = await store.create_kb("open", principal=OWNER)
    vectors = np.stack([unit([1, 0, 0, 0, 0, 0, 0, 0]), unit([1, 1, 0, 0, 0, 0, 0, 0]), axis(2)])
    await indexed(store, kb, "a.txt", ["near", "middle", "far"], vectors=vectors)
    found = await store.dense(axis(0), principal=STRANGER, limit=3, ef_search=40)
    assert await _texts(store, found) == ["near", "middle", "far"]


async def test_dense_returns_cosine_distance(store: KnowledgeStore) -> None:
    kb = await store.create_kb("open", principal=OWNER)
    await indexed(store, kb, "a.txt", ["x"], vectors=axis(3)[None, :])
    [(_, distance)] = await store.dense(axis(3), principal=STRANGER, limit=1, ef_search=40)
    assert distance == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("who", READERS, ids=[p.user for p in READERS])
async def test_dense_readers_find_private(
    store: KnowledgeStore, private: KnowledgeBase, public: KnowledgeBase, who: Principal
) -> None:
    found = await store.dense(axis(0), principal=who, limit=1, ef_search=40)
    assert await _texts(store, found) == ["报销 流程 机密"]


@pytest.mark.parametrize("who", NON_READERS, ids=[p.user for p in NON_READERS])
async def test_dense_never_returns_hidden_chunks(
    store: KnowledgeStore, private: KnowledgeBase, public: KnowledgeBase, who: Principal
) -> None:
    found = await store.dense(axis(0), principal=who, limit=10, ef_search=40)
    assert sorted(await _texts(store, found)) == ["年 假 申请", "报销 发票"]


async def test_dense_restricted_to_named_kbs(
    store: KnowledgeStore, private: KnowledgeBase, public: KnowledgeBase
) -> None:
    found = await store.dense(axis(0), principal=ADMIN, kbs=["open"], limit=10, ef_search=40)
    assert sorted(await _texts(store, found)) == ["年 假 申请", "报销 发票"]


async def test_dense_unknown_kb_name_finds_nothing(
    store: KnowledgeStore, public: KnowledgeBase
) -> None:
    assert await store.dense(axis(1), principal=ADMIN, kbs=["nope"], limit=5, ef_search=40) == []


async def test_dense_filtered_scan_still_fills_limit(store: KnowledgeStore) -> None:
    """Most near neighbours are hidden: the post-filtered HNSW scan falls short and the exact
    search over the readable chunks fills the limit."""
    rng = np.random.default_rng(3)
    hidden = await store.create_kb("hidden", principal=OWNER, public=False)
    crowd = axis(0) + 0.05 * rng.normal(size=(300, DIM)).astype(np.float32)
    crowd /= np.linalg.norm(crowd, axis=1, keepdims=True)
    await indexed(store, hidden, "crowd.txt", [f"h{i}" for i in range(300)], vectors=crowd)
    visible = await store.create_kb("visible", principal=OWNER)
    far = np.stack([axis(i) for i in (1, 2, 3)])
    await indexed(store, visible, "v.txt", ["v0", "v1", "v2"], vectors=far)
    found = await store.dense(axis(0), principal=STRANGER, limit=3, ef_search=10)
    assert sorted(await _texts(store, found)) == ["v0", "v1", "v2"]


async def test_exact_dense_matches_index(store: KnowledgeStore) -> None:
    rng = np.random.default_rng(5)
    kb = await store.create_kb("open", principal=OWNER)
    vectors = rng.normal(size=(200, DIM)).astype(np.float32)
    await indexed(store, kb, "a.txt", [f"t{i}" for i in range(200)], vectors=vectors)
    query = rng.normal(size=DIM).astype(np.float32)
    exact = await store.dense(query, principal=ADMIN, limit=5, ef_search=200, exact=True)
    approximate = await store.dense(query, principal=ADMIN, limit=5, ef_search=200)
    assert [i for i, _ in approximate] == [i for i, _ in exact]


async def test_dense_uses_the_hnsw_index(store: KnowledgeStore, db_url: str) -> None:
    rng = np.random.default_rng(7)
    kb = await store.create_kb("open", principal=OWNER)
    vectors = rng.normal(size=(500, DIM)).astype(np.float32)
    await indexed(store, kb, "a.txt", [f"t{i}" for i in range(500)], vectors=vectors)
    params = search.dense_params(vectors[0], principal=STRANGER, kbs=None, limit=10)
    async with await psycopg.AsyncConnection.connect(db_url) as conn, conn.transaction():
        cur = await VectorAdapters().cursor(conn)
        await cur.execute("SELECT set_config('hnsw.ef_search', '64', true)")
        await cur.execute("EXPLAIN " + search.DENSE_SQL, params)
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert f"Index Scan using {EMBEDDING_INDEX}" in plan


# Full text


async def test_text_finds_chinese_keyword(
    store: KnowledgeStore, fulltext: FullText, public: KnowledgeBase
) -> None:
    found = await store.text(fulltext.query_terms("报销"), principal=STRANGER, limit=5)
    assert await _texts(store, found) == ["报销 发票"]


async def test_text_ranks_more_matching_terms_first(
    store: KnowledgeStore, fulltext: FullText
) -> None:
    kb = await store.create_kb("open", principal=OWNER)
    texts = ["年假 规定", "申请 流程", "年假 申请 流程"]
    await indexed(store, kb, "a.txt", texts, search_texts=[fulltext.index_text(t) for t in texts])
    found = await store.text(fulltext.query_terms("年假如何申请"), principal=STRANGER, limit=5)
    assert (await _texts(store, found))[0] == "年假 申请 流程"


async def test_text_without_terms_finds_nothing(
    store: KnowledgeStore, public: KnowledgeBase
) -> None:
    assert await store.text([], principal=ADMIN, limit=5) == []


@pytest.mark.parametrize("term", HOSTILE)
async def test_hostile_terms_do_not_break_the_query(
    store: KnowledgeStore, public: KnowledgeBase, term: str
) -> None:
    found = await store.text([term, "报销"], principal=STRANGER, limit=5)
    assert await _texts(store, found) == ["报销 发票"]


@pytest.mark.parametrize("who", READERS, ids=[p.user for p in READERS])
async def test_text_readers_find_private(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    found = await store.text(["机密"], principal=who, limit=5)
    assert await _texts(store, found) == ["报销 流程 机密"]


@pytest.mark.parametrize("who", NON_READERS, ids=[p.user for p in NON_READERS])
async def test_text_never_returns_hidden_chunks(
    store: KnowledgeStore, private: KnowledgeBase, public: KnowledgeBase, who: Principal
) -> None:
    found = await store.text(["报销", "机密"], principal=who, limit=5)
    assert await _texts(store, found) == ["报销 发票"]


async def test_text_restricted_to_named_kbs(
    store: KnowledgeStore, private: KnowledgeBase, public: KnowledgeBase
) -> None:
    found = await store.text(["报销"], principal=ADMIN, kbs=["secret"], limit=5)
    assert await _texts(store, found) == ["报销 流程 机密"]


# Chunks


async def test_chunks_keep_requested_order(store: KnowledgeStore, public: KnowledgeBase) -> None:
    found = await store.text(["年", "报销"], principal=ADMIN, limit=5)
    ids = [chunk_id for chunk_id, _ in found][::-1]
    assert [row.id for row in await store.chunks(ids, principal=ADMIN)] == ids


async def test_chunks_skip_missing(store: KnowledgeStore, public: KnowledgeBase) -> None:
    [(chunk_id, _)] = await store.text(["报销"], principal=ADMIN, limit=5)
    assert [row.id for row in await store.chunks([999_999, chunk_id], principal=ADMIN)] == [
        chunk_id
    ]


async def test_chunks_name_document_and_kb(store: KnowledgeStore, public: KnowledgeBase) -> None:
    [(chunk_id, _)] = await store.text(["报销"], principal=ADMIN, limit=5)
    [row] = await store.chunks([chunk_id], principal=ADMIN)
    assert (row.document_name, row.kb, row.index, row.char_start) == ("open.txt", "open", 1, 7)


@pytest.mark.parametrize("who", NON_READERS, ids=[p.user for p in NON_READERS])
async def test_chunks_hide_unreadable(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    [(chunk_id, _)] = await store.text(["机密"], principal=ADMIN, limit=5)
    assert await store.chunks([chunk_id], principal=who) == []
