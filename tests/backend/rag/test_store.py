"""KnowledgeStore: the schema, the embedding setup, knowledge bases, documents and who sees them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from backend.auth import Principal
from backend.db import migrate, open_pool
from backend.errors import (
    ConfigError,
    DocumentNotFound,
    EmbeddingMismatch,
    Forbidden,
    KnowledgeBaseError,
    KnowledgeBaseNotFound,
)
from backend.rag.document import DocumentStatus
from backend.rag.records import KbAccess, KnowledgeBase
from backend.rag.store import KnowledgeStore
from tests.backend.rag.seed import (
    ADMIN,
    GRANTED_USER,
    OTHER_KB_ADMIN,
    OWNER,
    STRANGER,
    add,
    indexed,
    open_store,
    scratch_database,
    truncate,
)

# Who may read and write OWNER's private knowledge base, on which GRANTED_USER holds a read grant.
READERS = [ADMIN, OWNER, GRANTED_USER]
NON_READERS = [OTHER_KB_ADMIN, STRANGER]
WRITERS = [ADMIN, OWNER]
ids = [p.user for p in (ADMIN, OWNER, GRANTED_USER, OTHER_KB_ADMIN, STRANGER)]


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
async def private(store: KnowledgeStore) -> KnowledgeBase:
    kb = await store.create_kb("secret", principal=OWNER, public=False)
    await store.grant("secret", GRANTED_USER.user, access=KbAccess.READ, principal=OWNER)
    return kb


async def _count(url: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# Schema and embedding setup (fresh databases)


async def test_migration_creates_tables(database: str) -> None:
    await migrate(database)
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'rag_%'")
        tables = {row[0] for row in await cur.fetchall()}
    assert tables == {"rag_kbs", "rag_kb_grants", "rag_documents", "rag_chunks", "rag_meta"}


async def test_ensure_embedding_is_idempotent(database: str) -> None:
    async with open_store(database, dim=8) as store:
        await store.ensure_embedding(model="test-model", dim=8)
    async with await psycopg.AsyncConnection.connect(database) as conn:
        cur = await conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'rag_chunks'::regclass AND attname = 'embedding'"
        )
        assert await cur.fetchall() == [("vector(8)",)]


async def test_concurrent_ensure_embedding(database: str) -> None:
    await migrate(database)
    pools = [await open_pool(database, min_size=1, max_size=1) for _ in range(3)]
    try:
        stores = [KnowledgeStore(pool) for pool in pools]
        await asyncio.gather(*(s.ensure_embedding(model="m", dim=4) for s in stores))
        async with pools[0].connection() as conn:
            cur = await conn.execute("SELECT key, value FROM rag_meta ORDER BY key")
            meta = await cur.fetchall()
            cur = await conn.execute(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'rag_chunks_embedding_hnsw'"
            )
            indexes = await cur.fetchone()
    finally:
        for pool in pools:
            await pool.close()
    assert meta == [("embedding_dim", "4"), ("embedding_model", "m")]
    assert indexes == (1,)


async def test_other_model_raises(database: str) -> None:
    async with open_store(database, model="model-a") as store:
        with pytest.raises(EmbeddingMismatch):
            await store.ensure_embedding(model="model-b", dim=8)


async def test_other_dimension_raises(database: str) -> None:
    async with open_store(database, dim=8) as store:
        with pytest.raises(EmbeddingMismatch):
            await store.ensure_embedding(model="test-model", dim=16)


async def test_unindexable_dimension_raises(store: KnowledgeStore) -> None:
    with pytest.raises(ConfigError):
        await store.ensure_embedding(model="huge", dim=4096)


# Knowledge bases


async def test_user_may_not_create(store: KnowledgeStore) -> None:
    with pytest.raises(Forbidden):
        await store.create_kb("mine", principal=STRANGER)


async def test_duplicate_name_raises(store: KnowledgeStore) -> None:
    await store.create_kb("hr", principal=OWNER)
    with pytest.raises(KnowledgeBaseError, match="already exists"):
        await store.create_kb("hr", principal=ADMIN)


async def test_blank_name_raises(store: KnowledgeStore) -> None:
    with pytest.raises(KnowledgeBaseError):
        await store.create_kb("  ", principal=OWNER)


async def test_created_kb_is_returned_by_get(store: KnowledgeStore) -> None:
    created = await store.create_kb(" hr ", principal=OWNER, description="人事制度")
    assert await store.get_kb("hr", principal=OWNER) == created


@pytest.mark.parametrize("who", [ADMIN, OWNER, GRANTED_USER, OTHER_KB_ADMIN, STRANGER], ids=ids)
async def test_list_shows_readable(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    await store.create_kb("open", principal=ADMIN)
    names = [kb.name for kb in await store.list_kbs(principal=who)]
    assert names == (["open", "secret"] if who in READERS else ["open"])


@pytest.mark.parametrize("who", READERS, ids=[p.user for p in READERS])
async def test_readers_get_private(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    assert (await store.get_kb("secret", principal=who)).id == private.id


@pytest.mark.parametrize("who", NON_READERS, ids=[p.user for p in NON_READERS])
async def test_private_looks_missing(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    with pytest.raises(KnowledgeBaseNotFound) as hidden:
        await store.get_kb("secret", principal=who)
    with pytest.raises(KnowledgeBaseNotFound) as missing:
        await store.get_kb("no-such-kb", principal=who)
    assert hidden.value.user_message == missing.value.user_message


@pytest.mark.parametrize("who", WRITERS, ids=[p.user for p in WRITERS])
async def test_writers_get_for_write(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    assert (await store.get_kb("secret", principal=who, write=True)).writable


async def test_read_grant_does_not_write(store: KnowledgeStore, private: KnowledgeBase) -> None:
    with pytest.raises(Forbidden):
        await store.get_kb("secret", principal=GRANTED_USER, write=True)


async def test_public_kb_is_read_only_for_other_kb_admin(store: KnowledgeStore) -> None:
    await store.create_kb("open", principal=OWNER)
    with pytest.raises(Forbidden):
        await store.get_kb("open", principal=OTHER_KB_ADMIN, write=True)


async def test_write_grant_lets_kb_admin_write(
    store: KnowledgeStore, private: KnowledgeBase
) -> None:
    await store.grant("secret", OTHER_KB_ADMIN.user, access=KbAccess.WRITE, principal=OWNER)
    assert (await store.get_kb("secret", principal=OTHER_KB_ADMIN, write=True)).writable


async def test_write_grant_never_lets_user_write(
    store: KnowledgeStore, private: KnowledgeBase
) -> None:
    await store.grant("secret", GRANTED_USER.user, access=KbAccess.WRITE, principal=OWNER)
    with pytest.raises(Forbidden):
        await store.get_kb("secret", principal=GRANTED_USER, write=True)


async def test_reader_may_not_grant(store: KnowledgeStore, private: KnowledgeBase) -> None:
    with pytest.raises(Forbidden):
        await store.grant("secret", STRANGER.user, access=KbAccess.READ, principal=GRANTED_USER)


async def test_revoke_removes_access(store: KnowledgeStore, private: KnowledgeBase) -> None:
    assert await store.revoke("secret", GRANTED_USER.user, principal=OWNER)
    with pytest.raises(KnowledgeBaseNotFound):
        await store.get_kb("secret", principal=GRANTED_USER)


async def test_delete_kb_cascades(
    store: KnowledgeStore, private: KnowledgeBase, db_url: str
) -> None:
    await indexed(store, private, "a.txt", ["one", "two"])
    await store.delete_kb("secret", principal=OWNER)
    counts = [await _count(db_url, t) for t in ("rag_documents", "rag_chunks", "rag_kb_grants")]
    assert counts == [0, 0, 0]


async def test_delete_kb_returns_storage_keys(
    store: KnowledgeStore, private: KnowledgeBase
) -> None:
    record = await add(store, private, "a.txt")
    assert await store.delete_kb("secret", principal=ADMIN) == [record.storage_key]


@pytest.mark.parametrize(
    ("who", "error"),
    [(GRANTED_USER, Forbidden), (OTHER_KB_ADMIN, KnowledgeBaseNotFound)],
    ids=["reader", "stranger"],
)
async def test_delete_kb_needs_write(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await store.delete_kb("secret", principal=who)


# Documents


async def test_same_content_returns_existing(store: KnowledgeStore, private: KnowledgeBase) -> None:
    first = await add(store, private, "a.txt")
    again, created = await store.add_document(
        private, filename="copy.txt", content_hash=first.content_hash, size_bytes=10,
        format=None, storage_key=first.storage_key, uploaded_by=ADMIN.user,
    )  # fmt: skip
    assert (again.id, again.filename, created) == (first.id, "a.txt", False)


async def test_concurrent_same_content_creates_once(
    store: KnowledgeStore, private: KnowledgeBase
) -> None:
    results = await asyncio.gather(*(add(store, private, "a.txt") for _ in range(4)))
    assert len({record.id for record in results}) == 1


async def test_new_document_is_queued(store: KnowledgeStore, private: KnowledgeBase) -> None:
    record = await add(store, private, "a.txt")
    assert (record.status, record.kb, record.progress, record.attempts) == (
        DocumentStatus.QUEUED, "secret", 0.0, 0,
    )  # fmt: skip


async def test_add_to_deleted_kb_raises(store: KnowledgeStore, private: KnowledgeBase) -> None:
    await store.delete_kb("secret", principal=OWNER)
    with pytest.raises(KnowledgeBaseNotFound):
        await add(store, private, "a.txt")


@pytest.mark.parametrize("who", READERS, ids=[p.user for p in READERS])
async def test_readers_get_document(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    record = await add(store, private, "a.txt")
    assert await store.get_document(record.id, principal=who) == record


@pytest.mark.parametrize("who", NON_READERS, ids=[p.user for p in NON_READERS])
async def test_hidden_document_looks_missing(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    record = await add(store, private, "a.txt")
    with pytest.raises(DocumentNotFound):
        await store.get_document(record.id, principal=who)


async def test_malformed_document_id_is_missing(store: KnowledgeStore) -> None:
    with pytest.raises(DocumentNotFound):
        await store.get_document("../../etc/passwd", principal=ADMIN)


@pytest.mark.parametrize("who", READERS, ids=[p.user for p in READERS])
async def test_readers_list_documents(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    first, second = await add(store, private, "a.txt"), await add(store, private, "b.txt")
    listed = await store.list_documents(private, principal=who)
    assert {record.id for record in listed} == {first.id, second.id}


@pytest.mark.parametrize("who", NON_READERS, ids=[p.user for p in NON_READERS])
async def test_non_readers_cannot_list_documents(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal
) -> None:
    await add(store, private, "a.txt")
    with pytest.raises(KnowledgeBaseNotFound):
        await store.list_documents(private, principal=who)


async def test_list_documents_by_status(store: KnowledgeStore, private: KnowledgeBase) -> None:
    done = await indexed(store, private, "done.txt", ["x"])
    await add(store, private, "waiting.txt")
    listed = await store.list_documents(private, principal=OWNER, status=DocumentStatus.INDEXED)
    assert [record.id for record in listed] == [done.id]


async def test_delete_document_cascades(
    store: KnowledgeStore, private: KnowledgeBase, db_url: str
) -> None:
    record = await indexed(store, private, "a.txt", ["one", "two"])
    deleted = await store.delete_document(record.id, principal=OWNER)
    assert (deleted.id, await _count(db_url, "rag_chunks")) == (record.id, 0)


@pytest.mark.parametrize(
    ("who", "error"),
    [(GRANTED_USER, Forbidden), (OTHER_KB_ADMIN, DocumentNotFound), (STRANGER, DocumentNotFound)],
    ids=["reader", "kb_admin-stranger", "user-stranger"],
)
async def test_delete_document_needs_write(
    store: KnowledgeStore, private: KnowledgeBase, who: Principal, error: type[Exception]
) -> None:
    record = await add(store, private, "a.txt")
    with pytest.raises(error):
        await store.delete_document(record.id, principal=who)


async def test_requeue_resets_state(store: KnowledgeStore, private: KnowledgeBase) -> None:
    record = await add(store, private, "a.txt")
    await store.fail(record.id, code="malformed", message="文件已损坏")
    requeued = await store.requeue(record.id, principal=OWNER)
    assert (requeued.status, requeued.error_code, requeued.error, requeued.progress) == (
        DocumentStatus.QUEUED, None, None, 0.0,
    )  # fmt: skip


async def test_requeue_keeps_chunks_until_reindexed(
    store: KnowledgeStore, private: KnowledgeBase, db_url: str
) -> None:
    record = await indexed(store, private, "a.txt", ["one", "two"])
    await store.requeue(record.id, principal=OWNER)
    assert await _count(db_url, "rag_chunks") == 2


async def test_requeue_needs_write(store: KnowledgeStore, private: KnowledgeBase) -> None:
    record = await add(store, private, "a.txt")
    with pytest.raises(Forbidden):
        await store.requeue(record.id, principal=GRANTED_USER)


async def test_storage_key_in_use_until_last_reference(store: KnowledgeStore) -> None:
    one = await store.create_kb("one", principal=OWNER)
    two = await store.create_kb("two", principal=OWNER)
    key = "ab" * 32
    for kb in (one, two):
        await store.add_document(
            kb, filename="f.txt", content_hash=key, size_bytes=1, format=None,
            storage_key=key, uploaded_by=OWNER.user,
        )  # fmt: skip
    await store.delete_kb("one", principal=OWNER)
    in_use_after_first = await store.storage_key_in_use(key)
    await store.delete_kb("two", principal=OWNER)
    assert (in_use_after_first, await store.storage_key_in_use(key)) == (True, False)
