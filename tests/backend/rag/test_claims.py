"""The worker's leases on documents: claim, renew, progress, finish, fail, stuck."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import psycopg
import pytest

from backend.rag.document import DocumentStatus
from backend.rag.records import KnowledgeBase
from backend.rag.store import KnowledgeStore
from tests.backend.rag.seed import (
    ADMIN,
    DIM,
    OWNER,
    add,
    axis,
    chunks_of,
    indexed,
    open_store,
    scratch_database,
    truncate,
)


@pytest.fixture(scope="module")
async def db_url(database_url: str) -> AsyncIterator[str]:
    """One migrated database for the module; each test starts from empty tables."""
    async with scratch_database(database_url) as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[KnowledgeStore]:
    await truncate(db_url)
    async with open_store(db_url) as store:
        yield store


@pytest.fixture
async def kb(store: KnowledgeStore) -> KnowledgeBase:
    return await store.create_kb("hr", principal=OWNER)


async def _expire_lease(db_url: str, document_id: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE rag_documents SET lease_until = now() - interval '1 hour' WHERE id = %s",
            (document_id,),
        )


async def _age(db_url: str, document_id: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE rag_documents SET updated_at = now() - interval '1 hour' WHERE id = %s",
            (document_id,),
        )


async def _chunk_texts(db_url: str, document_id: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT text FROM rag_chunks WHERE document_id = %s ORDER BY idx", (document_id,)
        )
        return [row[0] for row in await cur.fetchall()]


def _vectors(n: int) -> np.ndarray:
    return np.stack([axis(i) for i in range(n)])


async def test_claim_sets_processing(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    assert (held.document.status, held.document.attempts) == (DocumentStatus.PROCESSING, 1)


async def test_second_claim_while_leased_is_none(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    assert await store.claim(record.id, lease_s=60) is not None
    assert await store.claim(record.id, lease_s=60) is None


async def test_claim_after_lease_expiry(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await add(store, kb, "a.txt")
    first = await store.claim(record.id, lease_s=60)
    await _expire_lease(db_url, record.id)
    second = await store.claim(record.id, lease_s=60)
    assert first is not None and second is not None
    assert second.token != first.token


async def test_claim_of_missing_document_is_none(store: KnowledgeStore) -> None:
    assert await store.claim("00000000-0000-0000-0000-000000000000", lease_s=60) is None


async def test_claim_of_malformed_id_is_none(store: KnowledgeStore) -> None:
    assert await store.claim("not-a-uuid", lease_s=60) is None


async def test_claim_of_indexed_document_is_none(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await indexed(store, kb, "a.txt", ["one"])
    assert await store.claim(record.id, lease_s=60) is None


async def test_finish_writes_chunks_and_status(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await indexed(store, kb, "a.txt", ["one", "two", "three"])
    assert (record.status, record.chunk_count, record.progress) == (DocumentStatus.INDEXED, 3, 1.0)
    assert record.indexed_at is not None


async def test_finish_records_guard_flags(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    await store.finish(
        held, chunks_of(["a", "b", "c"]), _vectors(3), search_texts=list("abc"),
        guard_categories=["赌博", "违禁品", "赌博"], guard_flagged_chunks=2,
    )  # fmt: skip
    after = await store.get_document(record.id, principal=ADMIN)
    assert (after.guard_categories, after.guard_flagged_chunks) == (("赌博", "违禁品"), 2)


async def test_document_starts_unflagged(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await indexed(store, kb, "a.txt", ["one"])
    assert (record.guard_categories, record.guard_flagged_chunks) == ((), 0)


async def test_reindex_replaces_guard_flags(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    await store.finish(
        held, chunks_of(["a"]), _vectors(1), search_texts=["a"], guard_categories=["赌博"],
        guard_flagged_chunks=1,
    )  # fmt: skip
    await store.requeue(record.id, principal=OWNER)
    again = await store.claim(record.id, lease_s=60)
    assert again is not None and again.document.guard_categories == ("赌博",)  # until finished
    await store.finish(again, chunks_of(["clean"]), _vectors(1), search_texts=["clean"])
    after = await store.get_document(record.id, principal=ADMIN)
    assert (after.guard_categories, after.guard_flagged_chunks) == ((), 0)


async def test_finish_rejects_more_flagged_chunks_than_chunks(
    store: KnowledgeStore, kb: KnowledgeBase
) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    with pytest.raises(ValueError, match="flagged"):
        await store.finish(
            held, chunks_of(["a"]), _vectors(1), search_texts=["a"], guard_flagged_chunks=2
        )


async def test_finish_with_stale_token_writes_nothing(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await add(store, kb, "a.txt")
    stale = await store.claim(record.id, lease_s=60)
    await _expire_lease(db_url, record.id)
    assert await store.claim(record.id, lease_s=60) is not None
    assert stale is not None
    assert await store.finish(stale, chunks_of(["x"]), _vectors(1), search_texts=["x"]) is False
    assert await _chunk_texts(db_url, record.id) == []


async def test_finish_replaces_previous_chunks(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await indexed(store, kb, "a.txt", ["old one", "old two"])
    await store.requeue(record.id, principal=OWNER)
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    await store.finish(held, chunks_of(["new"]), _vectors(1), search_texts=["new"])
    assert await _chunk_texts(db_url, record.id) == ["new"]


async def test_finish_is_all_or_nothing(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await indexed(store, kb, "a.txt", ["old"])
    await store.requeue(record.id, principal=OWNER)
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    vectors = _vectors(4)
    vectors[2, 0] = np.nan  # pgvector refuses NaN: the COPY fails on the third row
    with pytest.raises(psycopg.Error):
        await store.finish(held, chunks_of(list("abcd")), vectors, search_texts=list("abcd"))
    assert await _chunk_texts(db_url, record.id) == ["old"]
    after = await store.get_document(record.id, principal=ADMIN)
    assert after.status is DocumentStatus.PROCESSING


async def test_finish_rejects_mismatched_lengths(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    with pytest.raises(ValueError, match="embeddings"):
        await store.finish(held, chunks_of(["a", "b"]), _vectors(1), search_texts=["a", "b"])


async def test_finish_rejects_wrong_dimension(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    with pytest.raises(psycopg.Error):
        await store.finish(held, chunks_of(["a"]), np.ones((1, DIM + 1)), search_texts=["a"])
    assert await _chunk_texts(db_url, record.id) == []


async def test_finish_drops_nul_characters(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await indexed(store, kb, "a.txt", ["a\x00b"])
    assert await _chunk_texts(db_url, record.id) == ["ab"]


async def test_renew_extends_the_lease(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=1)
    assert held is not None
    assert await store.renew(held, lease_s=3600)
    assert await store.claim(record.id, lease_s=60) is None


async def test_renew_after_takeover_fails(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    await _expire_lease(db_url, record.id)
    await store.claim(record.id, lease_s=60)
    assert held is not None
    assert await store.renew(held, lease_s=60) is False


async def test_set_progress_is_clamped(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    assert await store.set_progress(held, 1.7)
    assert (await store.get_document(record.id, principal=ADMIN)).progress == 1.0


async def test_requeue_fences_the_running_claim(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    await store.requeue(record.id, principal=OWNER)
    assert held is not None
    assert await store.set_progress(held, 0.5) is False


async def test_fail_with_claim_records_error(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    assert await store.fail(held, code="no_text", message="文件中没有可提取的文字")
    failed = await store.get_document(record.id, principal=ADMIN)
    assert (failed.status, failed.error_code, failed.error) == (
        DocumentStatus.FAILED, "no_text", "文件中没有可提取的文字",
    )  # fmt: skip


async def test_fail_with_stale_claim_is_refused(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await add(store, kb, "a.txt")
    stale = await store.claim(record.id, lease_s=60)
    await _expire_lease(db_url, record.id)
    await store.claim(record.id, lease_s=60)
    assert stale is not None
    assert await store.fail(stale, code="x", message="y") is False


async def test_fail_by_id_without_claim(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    assert await store.fail(record.id, code="max_deliveries", message="失败")
    failed = await store.get_document(record.id, principal=ADMIN)
    assert failed.status is DocumentStatus.FAILED


async def test_fail_by_id_leaves_indexed_document(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await indexed(store, kb, "a.txt", ["one"])
    assert await store.fail(record.id, code="x", message="y") is False


async def test_claim_clears_previous_error(store: KnowledgeStore, kb: KnowledgeBase) -> None:
    record = await add(store, kb, "a.txt")
    await store.fail(record.id, code="x", message="y")
    await store.requeue(record.id, principal=OWNER)
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    assert (held.document.error_code, held.document.error) == (None, None)


async def test_stuck_lists_old_queued(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    old, fresh = await add(store, kb, "old.txt"), await add(store, kb, "fresh.txt")
    await _age(db_url, old.id)
    assert fresh.id != old.id
    assert await store.stuck(queued_for_s=60, processing_grace_s=60) == [old.id]


async def test_stuck_lists_expired_processing(
    store: KnowledgeStore, kb: KnowledgeBase, db_url: str
) -> None:
    record = await add(store, kb, "a.txt")
    await store.claim(record.id, lease_s=60)
    assert await store.stuck(queued_for_s=3600, processing_grace_s=60) == []
    await _expire_lease(db_url, record.id)
    assert await store.stuck(queued_for_s=3600, processing_grace_s=60) == [record.id]
