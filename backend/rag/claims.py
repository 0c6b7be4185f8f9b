"""The worker's side of the document table: leases (claims) and the writes made under them.

A worker claims a queued document (or one whose lease ran out) and gets a fresh lease token; every
later write checks that token, so a worker that lost its lease (it stalled, the document was
requeued, another worker took over) cannot overwrite newer work: its writes return False. The
worker is trusted: nothing here checks a principal.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from psycopg import AsyncConnection

from backend.rag.document import Chunk
from backend.rag.records import DOCUMENT_COLUMNS, Claim, document_from_row
from backend.rag.vectors import VectorAdapters

logger = logging.getLogger(__name__)

# The CTE is named `d` so DOCUMENT_COLUMNS reads the updated row (the outer query would otherwise
# see the table as it was before the UPDATE).
_CLAIM_SQL = f"""
WITH d AS (
    UPDATE rag_documents SET
        status = 'processing', attempts = attempts + 1, progress = 0,
        lease_token = gen_random_uuid(), lease_until = now() + make_interval(secs => %(lease_s)s),
        error_code = NULL, error = NULL, updated_at = now()
    WHERE id = %(id)s
      AND (status = 'queued' OR (status = 'processing' AND lease_until < now()))
    RETURNING *
)
SELECT {DOCUMENT_COLUMNS}, d.lease_token, d.lease_until FROM d JOIN rag_kbs k ON k.id = d.kb_id
"""  # noqa: S608 - constant fragments only

_FAIL = (
    "UPDATE rag_documents SET status = 'failed', error_code = %s, error = %s,"
    " lease_token = NULL, lease_until = NULL, updated_at = now() WHERE id = %s"
)
_COPY_SQL = (
    "COPY rag_chunks (document_id, kb_id, idx, text, search_text, heading, page_start,"
    " page_end, char_start, char_end, tokens, embedding) FROM STDIN (FORMAT BINARY)"
)
_COPY_TYPES = ["uuid", "uuid", "int4", "text", "text", "text"] + ["int4"] * 5 + ["vector"]


async def claim(conn: AsyncConnection[Any], document_id: str, *, lease_s: float) -> Claim | None:
    """Lease the document for `lease_s` seconds if it is queued, or processing under an expired
    lease; None if it is gone, indexed, failed or leased by another worker. Counts an attempt
    and resets progress and the previous error."""
    cur = await conn.execute(_CLAIM_SQL, {"id": document_id, "lease_s": lease_s})
    row = await cur.fetchone()
    if row is None:
        return None
    return Claim(document=document_from_row(row[:-2]), token=str(row[-2]), lease_until=row[-1])


async def renew(conn: AsyncConnection[Any], held: Claim, *, lease_s: float) -> bool:
    """Extend the lease to now + `lease_s`; False if it was lost."""
    cur = await conn.execute(
        "UPDATE rag_documents SET lease_until = now() + make_interval(secs => %s)"
        " WHERE id = %s AND lease_token = %s AND status = 'processing' RETURNING 1",
        (lease_s, held.document.id, held.token),
    )
    return await cur.fetchone() is not None


async def set_progress(conn: AsyncConnection[Any], held: Claim, progress: float) -> bool:
    """Record progress (clamped to 0..1); False if the lease was lost."""
    cur = await conn.execute(
        "UPDATE rag_documents SET progress = %s, updated_at = now()"
        " WHERE id = %s AND lease_token = %s AND status = 'processing' RETURNING 1",
        (min(max(progress, 0.0), 1.0), held.document.id, held.token),
    )
    return await cur.fetchone() is not None


async def finish(
    conn: AsyncConnection[Any],
    vectors: VectorAdapters,
    held: Claim,
    chunks: Sequence[Chunk],
    embeddings: np.ndarray,
    *,
    search_texts: Sequence[str],
    guard_categories: Sequence[str] = (),
    guard_flagged_chunks: int = 0,
) -> bool:
    """Replace the document's chunks and mark it indexed, in one transaction.

    `embeddings` is float (len(chunks), dim), row i for chunks[i]; `search_texts[i]` is chunks[i]
    segmented for full-text search. `guard_categories` (stored sorted, without repeats) and
    `guard_flagged_chunks` are what the guard found in the chunks; they replace the previous
    run's. Locks the document row and checks the lease token first: False (nothing written) if
    the claim was fenced off. Any error rolls everything back, so the previous chunks, flags and
    status stay as they were. NUL characters are dropped from texts (PostgreSQL text cannot hold
    them). Raises ValueError on mismatched lengths or a flagged-chunk count outside
    0..len(chunks), psycopg.Error on bad vectors (NaN, wrong dimension).
    """
    if not (len(chunks) == len(search_texts) == len(embeddings)):
        raise ValueError(
            f"{len(chunks)} chunks, {len(search_texts)} search texts, {len(embeddings)} embeddings"
        )
    if not 0 <= guard_flagged_chunks <= len(chunks):
        raise ValueError(f"{guard_flagged_chunks} flagged chunks of {len(chunks)}")
    async with conn.transaction():
        cur = await vectors.cursor(conn)
        await cur.execute(
            "SELECT kb_id FROM rag_documents WHERE id = %s AND lease_token = %s"
            " AND status = 'processing' FOR UPDATE",
            (held.document.id, held.token),
        )
        row = await cur.fetchone()
        if row is None:
            logger.info("document %s: lease lost, results discarded", held.document.id)
            return False
        document_id, kb_id = uuid.UUID(held.document.id), row[0]
        await cur.execute("DELETE FROM rag_chunks WHERE document_id = %s", (held.document.id,))
        async with cur.copy(_COPY_SQL) as copy:
            copy.set_types(_COPY_TYPES)
            for chunk, search_text, embedding in zip(chunks, search_texts, embeddings, strict=True):
                await copy.write_row(
                    (
                        document_id, kb_id, chunk.index, _clean(chunk.text),
                        _clean(search_text), _clean(chunk.heading), chunk.page_start,
                        chunk.page_end, chunk.char_start, chunk.char_end, chunk.tokens,
                        embedding,
                    )
                )  # fmt: skip
        await cur.execute(
            "UPDATE rag_documents SET status = 'indexed', progress = 1, chunk_count = %s,"
            " guard_categories = %s, guard_flagged_chunks = %s,"
            " error_code = NULL, error = NULL, lease_token = NULL, lease_until = NULL,"
            " indexed_at = now(), updated_at = now() WHERE id = %s",
            (len(chunks), sorted(set(guard_categories)), guard_flagged_chunks, held.document.id),
        )
    return True


async def fail(conn: AsyncConnection[Any], target: Claim | str, *, code: str, message: str) -> bool:
    """Mark the document failed with `code` and the user-facing `message`, clearing the lease.

    With a Claim, only while its lease holds (False if fenced off); with a document id (the
    reconciler giving up on a document), unconditionally unless it is already indexed. False if
    nothing was updated.
    """
    if isinstance(target, Claim):
        query, params = _FAIL + " AND lease_token = %s", [target.document.id, target.token]
    else:
        query, params = _FAIL + " AND status <> 'indexed'", [target]
    cur = await conn.execute(query + " RETURNING 1", [code, message, *params])
    return await cur.fetchone() is not None


async def stuck(
    conn: AsyncConnection[Any], *, queued_for_s: float, processing_grace_s: float
) -> list[str]:
    """Ids of documents queued and untouched for `queued_for_s` seconds, or processing under a
    lease that ran out more than `processing_grace_s` seconds ago (oldest first)."""
    cur = await conn.execute(
        "SELECT id FROM rag_documents WHERE"
        " (status = 'queued' AND updated_at < now() - make_interval(secs => %s))"
        " OR (status = 'processing' AND lease_until < now() - make_interval(secs => %s))"
        " ORDER BY updated_at",
        (queued_for_s, processing_grace_s),
    )
    return [str(row[0]) for row in await cur.fetchall()]


def _clean(text: str | None) -> str | None:
    return text.replace("\x00", "") if text is not None else None
