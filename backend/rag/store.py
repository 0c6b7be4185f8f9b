"""The knowledge-base store in PostgreSQL + pgvector: knowledge bases, documents, chunks, search.

    store = KnowledgeStore(pool)                      # pool from backend.db.open_pool (migrated)
    await store.ensure_embedding(model=..., dim=...)  # once at startup, before finish/dense
    kb = await store.get_kb("hr", principal=p, write=True)
    record, created = await store.add_document(kb, filename=..., ...)

Access rules (backend/rag/access.py) are part of the SQL of every method that takes a principal:
a knowledge base the principal may not read raises KnowledgeBaseNotFound / DocumentNotFound
exactly like a missing one; one it may read but not write raises Forbidden. The worker-side
methods (claim ... stuck, backend/rag/claims.py) take no principal: the worker is trusted.

Every method takes its own connection from the pool for the call and returns it; methods are safe
to call concurrently. pgvector adapters are registered on this store's cursors only
(backend/rag/vectors.py): the pool needs no configure callback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from psycopg import sql
from psycopg.errors import ForeignKeyViolation, UniqueViolation
from psycopg_pool import AsyncConnectionPool

from backend.auth import Principal
from backend.errors import (
    ConfigError,
    EmbeddingMismatch,
    Forbidden,
    KnowledgeBaseError,
    KnowledgeBaseNotFound,
)
from backend.rag import claims, search
from backend.rag.access import READABLE, WRITABLE, acl_params, document_for, kb_for, parse_uuid
from backend.rag.document import Chunk, DocumentFormat, DocumentStatus
from backend.rag.records import (
    DOCUMENT_COLUMNS,
    KB_COLUMNS,
    Claim,
    DocumentRecord,
    KbAccess,
    KnowledgeBase,
    document_from_row,
    kb_from_row,
)
from backend.rag.search import ChunkRow
from backend.rag.vectors import VectorAdapters

logger = logging.getLogger(__name__)

EMBEDDING_INDEX = "rag_chunks_embedding_hnsw"
EMBEDDING_INDEX_SQL = (
    f"CREATE INDEX IF NOT EXISTS {EMBEDDING_INDEX} ON rag_chunks"
    " USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
)
MAX_DIM = 2000  # pgvector's limit for an HNSW index on `vector`
MAX_KB_NAME = 100
_EMBEDDING_LOCK = 0x71726167  # "qrag"

# Constant fragments only (records.py, access.py); values always travel as parameters.
_LIST_KBS = f"SELECT {KB_COLUMNS}, {WRITABLE} FROM rag_kbs k WHERE {READABLE} ORDER BY k.name"  # noqa: S608
_KB_READABLE = f"SELECT 1 FROM rag_kbs k WHERE k.id = %(kb)s AND {READABLE}"  # noqa: S608
_DOCUMENTS = f"SELECT {DOCUMENT_COLUMNS} FROM rag_documents d JOIN rag_kbs k ON k.id = d.kb_id"  # noqa: S608
_DOCUMENT_BY_HASH = _DOCUMENTS + " WHERE d.kb_id = %s AND d.content_hash = %s"
_LIST_DOCUMENTS = (
    f"{_DOCUMENTS} WHERE d.kb_id = %(kb)s AND {READABLE}"
    " AND (%(status)s::text IS NULL OR d.status = %(status)s::text)"
    " ORDER BY d.created_at DESC, d.id"
)


class KnowledgeStore:
    """Knowledge bases, documents and chunks in the pool's (migrated) database; see the module
    docstring for the access rules. Safe for concurrent use."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._vectors = VectorAdapters()

    async def ensure_embedding(self, *, model: str, dim: int) -> None:
        """Add `embedding vector(dim)` and its HNSW index (cosine, m=16, ef_construction=64) on
        first use and record `model` and `dim`; later calls only compare. Safe when several
        processes start together (advisory lock). Raises EmbeddingMismatch if the store was set
        up for another model or dimension, ConfigError for a dimension pgvector cannot index."""
        if not 1 <= dim <= MAX_DIM:
            raise ConfigError(f"embedding dimension {dim} is outside 1..{MAX_DIM}")
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_EMBEDDING_LOCK,))
            cur = await conn.execute(
                "SELECT key, value FROM rag_meta WHERE key IN ('embedding_model', 'embedding_dim')"
            )
            recorded: dict[str, str] = {row[0]: row[1] for row in await cur.fetchall()}
            if not recorded:
                column = sql.SQL("ALTER TABLE rag_chunks ADD COLUMN embedding vector({}) NOT NULL")
                await conn.execute(column.format(sql.Literal(dim)))
                await conn.execute(EMBEDDING_INDEX_SQL)
                await conn.execute(
                    "INSERT INTO rag_meta (key, value)"
                    " VALUES ('embedding_model', %s), ('embedding_dim', %s)",
                    (model, str(dim)),
                )
                logger.info("knowledge store set up for %s (%d dimensions)", model, dim)
                return
        if recorded != {"embedding_model": model, "embedding_dim": str(dim)}:
            raise EmbeddingMismatch(
                f"the store holds embeddings of {recorded.get('embedding_model')}"
                f" ({recorded.get('embedding_dim')} dimensions); configured: {model} ({dim});"
                " rebuild the knowledge store or configure the recorded model"
            )

    # Knowledge bases

    async def create_kb(
        self, name: str, *, principal: Principal, description: str = "", public: bool = True
    ) -> KnowledgeBase:
        """Raises Forbidden for role `user`, KnowledgeBaseError for an empty, overlong (over 100
        characters) or taken name."""
        if not principal.may_manage_documents:
            raise Forbidden(f"{principal.user} may not create knowledge bases")
        name = name.strip()
        if not name or len(name) > MAX_KB_NAME:
            raise KnowledgeBaseError(f"a knowledge base name needs 1..{MAX_KB_NAME} characters")
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "INSERT INTO rag_kbs (name, description, public, created_by)"
                    " VALUES (%s, %s, %s, %s) RETURNING id, created_at",
                    (name, description, public, principal.user),
                )
                row = await cur.fetchone()
        except UniqueViolation as exc:
            raise KnowledgeBaseError(f"a knowledge base named {name!r} already exists") from exc
        assert row is not None
        return KnowledgeBase(
            id=str(row[0]), name=name, description=description, public=public,
            created_by=principal.user, created_at=row[1], document_count=0, writable=True,
        )  # fmt: skip

    async def list_kbs(self, *, principal: Principal) -> list[KnowledgeBase]:
        """The knowledge bases the principal may read, by name."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(_LIST_KBS, acl_params(principal))
            return [kb_from_row(row) for row in await cur.fetchall()]

    async def get_kb(
        self, name: str, *, principal: Principal, write: bool = False
    ) -> KnowledgeBase:
        """Raises KnowledgeBaseNotFound (absent or unreadable), Forbidden (`write` and the
        principal may only read it)."""
        async with self._pool.connection() as conn:
            return await kb_for(conn, name, principal=principal, write=write)

    async def delete_kb(self, name: str, *, principal: Principal) -> list[str]:
        """Delete the knowledge base with its documents and chunks; returns the distinct storage
        keys of its documents (files may be shared: check storage_key_in_use before removing
        one). Raises KnowledgeBaseNotFound, Forbidden."""
        async with self._pool.connection() as conn, conn.transaction():
            kb = await kb_for(conn, name, principal=principal, write=True, lock=True)
            cur = await conn.execute(
                "DELETE FROM rag_documents WHERE kb_id = %s RETURNING storage_key", (kb.id,)
            )
            keys = sorted({row[0] for row in await cur.fetchall()})
            await conn.execute("DELETE FROM rag_kbs WHERE id = %s", (kb.id,))
        logger.info("knowledge base %s deleted by %s", kb.name, principal.user)
        return keys

    async def grant(self, name: str, user: str, *, access: KbAccess, principal: Principal) -> None:
        """Give `user` read or write access (replacing an earlier grant). Needs write access."""
        async with self._pool.connection() as conn, conn.transaction():
            kb = await kb_for(conn, name, principal=principal, write=True)
            await conn.execute(
                "INSERT INTO rag_kb_grants (kb_id, user_identifier, access) VALUES (%s, %s, %s)"
                " ON CONFLICT (kb_id, user_identifier) DO UPDATE SET access = EXCLUDED.access",
                (kb.id, user, access.value),
            )

    async def revoke(self, name: str, user: str, *, principal: Principal) -> bool:
        """Remove `user`'s grant; False if there was none. Needs write access."""
        async with self._pool.connection() as conn, conn.transaction():
            kb = await kb_for(conn, name, principal=principal, write=True)
            cur = await conn.execute(
                "DELETE FROM rag_kb_grants WHERE kb_id = %s AND user_identifier = %s RETURNING 1",
                (kb.id, user),
            )
            return await cur.fetchone() is not None

    # Documents

    async def add_document(
        self,
        kb: KnowledgeBase,
        *,
        filename: str,
        content_hash: str,
        size_bytes: int,
        format: DocumentFormat | None,
        storage_key: str,
        uploaded_by: str,
    ) -> tuple[DocumentRecord, bool]:
        """Record a queued document in `kb` (whose write access the caller checked with get_kb);
        returns it and True, or the document with the same content already in `kb` and False
        (race-safe). Raises KnowledgeBaseNotFound if `kb` was deleted meanwhile."""
        async with self._pool.connection() as conn:
            for _ in range(3):  # the existing row may be deleted between INSERT and SELECT
                try:
                    cur = await conn.execute(
                        "INSERT INTO rag_documents (kb_id, filename, content_hash, size_bytes,"
                        " format, storage_key, uploaded_by) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT (kb_id, content_hash) DO NOTHING RETURNING id",
                        (kb.id, filename, content_hash, size_bytes,
                         format.value if format else None, storage_key, uploaded_by),
                    )  # fmt: skip
                except ForeignKeyViolation as exc:
                    raise KnowledgeBaseNotFound(f"knowledge base {kb.name!r} is gone") from exc
                created = await cur.fetchone() is not None
                cur = await conn.execute(_DOCUMENT_BY_HASH, (kb.id, content_hash))
                row = await cur.fetchone()
                if row is not None:
                    return document_from_row(row), created
        raise KnowledgeBaseError(f"document {content_hash} in {kb.name!r} keeps vanishing")

    async def get_document(self, document_id: str, *, principal: Principal) -> DocumentRecord:
        """Raises DocumentNotFound if it is absent or its knowledge base is not readable."""
        async with self._pool.connection() as conn:
            return await document_for(conn, document_id, principal=principal)

    async def list_documents(
        self, kb: KnowledgeBase, *, principal: Principal, status: DocumentStatus | None = None
    ) -> list[DocumentRecord]:
        """The documents of `kb`, newest first, optionally only those in `status`. Raises
        KnowledgeBaseNotFound if the principal may not read `kb` (or it was deleted)."""
        params = {"kb": kb.id, "status": status.value if status else None}
        params.update(acl_params(principal))
        async with self._pool.connection() as conn:
            cur = await conn.execute(_KB_READABLE, params)
            if await cur.fetchone() is None:
                raise KnowledgeBaseNotFound(f"no readable knowledge base {kb.name!r}")
            cur = await conn.execute(_LIST_DOCUMENTS, params)
            return [document_from_row(row) for row in await cur.fetchall()]

    async def delete_document(self, document_id: str, *, principal: Principal) -> DocumentRecord:
        """Delete the document and its chunks; returns it as it was. Raises DocumentNotFound,
        Forbidden (readable but not writable)."""
        async with self._pool.connection() as conn, conn.transaction():
            record = await document_for(conn, document_id, principal=principal, write=True)
            await conn.execute("DELETE FROM rag_documents WHERE id = %s", (record.id,))
        return record

    async def requeue(self, document_id: str, *, principal: Principal) -> DocumentRecord:
        """Set the document back to queued (progress 0, error and attempts cleared) for the
        worker to index again; its current chunks stay searchable until then. A worker still
        holding a claim on it is fenced off. Raises DocumentNotFound, Forbidden."""
        async with self._pool.connection() as conn, conn.transaction():
            record = await document_for(conn, document_id, principal=principal, write=True)
            await conn.execute(
                "UPDATE rag_documents SET status = 'queued', progress = 0, error_code = NULL,"
                " error = NULL, attempts = 0, lease_token = NULL, lease_until = NULL,"
                " updated_at = now() WHERE id = %s",
                (record.id,),
            )
            record = await document_for(conn, document_id, principal=principal)
        return record

    async def storage_key_in_use(self, storage_key: str) -> bool:
        """Whether any document still refers to the stored file (files are shared by content)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM rag_documents WHERE storage_key = %s LIMIT 1", (storage_key,)
            )
            return await cur.fetchone() is not None

    # The worker's side (trusted; see backend/rag/claims.py)

    async def claim(self, document_id: str, *, lease_s: float) -> Claim | None:
        if parse_uuid(document_id) is None:
            return None
        async with self._pool.connection() as conn:
            return await claims.claim(conn, document_id, lease_s=lease_s)

    async def renew(self, held: Claim, *, lease_s: float) -> bool:
        async with self._pool.connection() as conn:
            return await claims.renew(conn, held, lease_s=lease_s)

    async def set_progress(self, held: Claim, progress: float) -> bool:
        async with self._pool.connection() as conn:
            return await claims.set_progress(conn, held, progress)

    async def finish(
        self,
        held: Claim,
        chunks: Sequence[Chunk],
        embeddings: np.ndarray,
        *,
        search_texts: Sequence[str],
        guard_categories: Sequence[str] = (),
        guard_flagged_chunks: int = 0,
    ) -> bool:
        async with self._pool.connection() as conn:
            return await claims.finish(
                conn, self._vectors, held, chunks, embeddings, search_texts=search_texts,
                guard_categories=guard_categories, guard_flagged_chunks=guard_flagged_chunks,
            )  # fmt: skip

    async def fail(self, target: Claim | str, *, code: str, message: str) -> bool:
        if isinstance(target, str) and parse_uuid(target) is None:
            return False
        async with self._pool.connection() as conn:
            return await claims.fail(conn, target, code=code, message=message)

    async def stuck(self, *, queued_for_s: float, processing_grace_s: float) -> list[str]:
        async with self._pool.connection() as conn:
            return await claims.stuck(
                conn, queued_for_s=queued_for_s, processing_grace_s=processing_grace_s
            )

    # Search (see backend/rag/search.py)

    async def dense(
        self,
        query_vec: np.ndarray,
        *,
        principal: Principal,
        kbs: Sequence[str] | None = None,
        limit: int,
        ef_search: int,
        exact: bool = False,
    ) -> list[tuple[int, float]]:
        async with self._pool.connection() as conn:
            return await search.dense(
                conn, self._vectors, query_vec, principal=principal, kbs=kbs, limit=limit,
                ef_search=ef_search, exact=exact,
            )  # fmt: skip

    async def text(
        self,
        terms: Sequence[str],
        *,
        principal: Principal,
        kbs: Sequence[str] | None = None,
        limit: int,
    ) -> list[tuple[int, float]]:
        async with self._pool.connection() as conn:
            return await search.text(conn, terms, principal=principal, kbs=kbs, limit=limit)

    async def chunks(self, ids: Sequence[int], *, principal: Principal) -> list[ChunkRow]:
        async with self._pool.connection() as conn:
            return await search.chunks(conn, ids, principal=principal)
