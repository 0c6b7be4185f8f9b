"""Helpers for the knowledge-store tests: a migrated store, principals, indexed documents, words
the built-in guard lexicon blocks."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence

import numpy as np
import psycopg
from psycopg import sql

from backend.auth import Principal, Role
from backend.db import migrate, open_pool
from backend.embedded import ensure_database
from backend.guard import Lexicon, Severity, builtin_lexicon_dir
from backend.rag.document import Chunk, DocumentFormat
from backend.rag.records import DocumentRecord, KnowledgeBase
from backend.rag.store import KnowledgeStore

DIM = 8
MODEL = "test-model"

ADMIN = Principal("root", Role.ADMIN)
OWNER = Principal("olga", Role.KB_ADMIN)  # creates the knowledge bases
OTHER_KB_ADMIN = Principal("kim", Role.KB_ADMIN)
GRANTED_USER = Principal("gus", Role.USER)
STRANGER = Principal("sam", Role.USER)


def blocked_words() -> dict[str, str]:
    """One blocked word per category of the built-in lexicon (category -> word), picked as
    tests/backend/chat/test_grounding.py picks one: no jieba word-boundary entries."""
    words: dict[str, str] = {}
    for e in Lexicon.load(builtin_lexicon_dir()).entries:
        if e.severity is Severity.BLOCK and not e.whole_word:
            words.setdefault(e.category, e.word)
    return words


@contextlib.asynccontextmanager
async def open_store(
    url: str, *, dim: int = DIM, model: str = MODEL
) -> AsyncIterator[KnowledgeStore]:
    """A KnowledgeStore on the migrated database `url`, set up for `dim`-d embeddings."""
    await migrate(url)
    pool = await open_pool(url, min_size=1, max_size=4)
    try:
        store = KnowledgeStore(pool)
        await store.ensure_embedding(model=model, dim=dim)
        yield store
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def scratch_database(server_url: str, *, dim: int = DIM) -> AsyncIterator[str]:
    """URL of a new migrated database set up for `dim`-d embeddings, dropped afterwards; for a
    module's tests, each of which starts with `truncate` (much faster than a database each)."""
    name = f"test_rag_{uuid.uuid4().hex}"
    url = ensure_database(server_url, name)
    try:
        async with open_store(url, dim=dim):
            pass
        yield url
    finally:
        async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            await conn.execute(drop.format(sql.Identifier(name)))


async def truncate(url: str) -> None:
    """Empty every knowledge-store table (the embedding setup in rag_meta stays)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "TRUNCATE rag_kbs, rag_kb_grants, rag_documents, rag_chunks RESTART IDENTITY CASCADE"
        )


def unit(values: Sequence[float]) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def axis(i: int, *, dim: int = DIM) -> np.ndarray:
    """The unit vector along axis `i`."""
    vector = np.zeros(dim, dtype=np.float32)
    vector[i % dim] = 1.0
    return vector


def chunks_of(texts: Sequence[str]) -> list[Chunk]:
    chunks, offset = [], 0
    for index, text in enumerate(texts):
        chunks.append(Chunk(index, text, offset, offset + len(text), tokens=len(text.split())))
        offset += len(text) + 1
    return chunks


async def add(store: KnowledgeStore, kb: KnowledgeBase, name: str) -> DocumentRecord:
    """A queued document named `name` (its content hash derives from the name)."""
    digest = hashlib.sha256(f"{kb.name}/{name}".encode()).hexdigest()
    record, _ = await store.add_document(
        kb, filename=name, content_hash=digest, size_bytes=10, format=DocumentFormat.TXT,
        storage_key=digest, uploaded_by=OWNER.user,
    )  # fmt: skip
    return record


async def indexed(
    store: KnowledgeStore,
    kb: KnowledgeBase,
    name: str,
    texts: Sequence[str],
    *,
    vectors: np.ndarray | None = None,
    search_texts: Sequence[str] | None = None,
) -> DocumentRecord:
    """A document indexed through claim + finish; vectors default to axis(i) per chunk and
    search texts to the texts themselves (already space-separated words)."""
    record = await add(store, kb, name)
    held = await store.claim(record.id, lease_s=60)
    assert held is not None
    if vectors is None:
        vectors = np.stack([axis(i) for i in range(len(texts))]) if texts else np.zeros((0, DIM))
    written = await store.finish(
        held, chunks_of(texts), vectors, search_texts=search_texts or list(texts)
    )
    assert written
    return await store.get_document(record.id, principal=ADMIN)
