"""The SQL of retrieval: dense (HNSW) search, full-text search, and fetching the chunks found.

Every query admits only chunks of knowledge bases the principal may read (access.READABLE_KB_IDS),
optionally narrowed to the KBs named in `kbs`; unknown or invisible names simply match nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from psycopg import AsyncConnection

from backend.auth import Principal
from backend.rag.access import READABLE, READABLE_KB_IDS, acl_params
from backend.rag.vectors import VectorAdapters

MAX_TERMS = 32  # full-text terms per query; the rest are dropped
MAX_EF_SEARCH = 1000  # pgvector's upper bound

DENSE_SQL = f"""
SELECT c.id, c.embedding <=> %(q)s AS distance
FROM rag_chunks c
WHERE c.kb_id IN {READABLE_KB_IDS}
ORDER BY distance
LIMIT %(limit)s
"""  # noqa: S608 - constant fragments only; values travel as parameters

_CHUNKS_SQL = f"""
SELECT c.id, c.document_id, d.filename, k.name, c.idx, c.text, c.heading, c.page_start,
       c.page_end, c.char_start, c.char_end
FROM rag_chunks c
JOIN rag_documents d ON d.id = c.document_id
JOIN rag_kbs k ON k.id = c.kb_id
WHERE c.id = ANY(%(ids)s) AND {READABLE}
"""  # noqa: S608


@dataclass(frozen=True)
class ChunkRow:
    """A stored chunk with the names of its document and knowledge base."""

    id: int
    document_id: str
    document_name: str
    kb: str
    index: int
    text: str
    heading: str | None
    page_start: int | None
    page_end: int | None
    char_start: int
    char_end: int


def dense_params(
    query_vec: np.ndarray, *, principal: Principal, kbs: Sequence[str] | None, limit: int
) -> dict[str, Any]:
    """The parameters of DENSE_SQL (needs a cursor from VectorAdapters)."""
    vector = np.asarray(query_vec, dtype=np.float32).reshape(-1)
    names = list(kbs) if kbs is not None else None
    return {"q": vector, "limit": limit, "kb_names": names, **acl_params(principal)}


async def dense(
    conn: AsyncConnection[Any],
    vectors: VectorAdapters,
    query_vec: np.ndarray,
    *,
    principal: Principal,
    kbs: Sequence[str] | None,
    limit: int,
    ef_search: int,
    exact: bool = False,
) -> list[tuple[int, float]]:
    """(chunk id, cosine distance) of the `limit` nearest readable chunks, nearest first.

    Runs in its own transaction on `conn` with `hnsw.ef_search` set locally to
    max(ef_search, limit) (capped at 1000), so the setting never leaks into the pooled connection.
    pgvector 0.6 filters an HNSW scan's candidates after the scan, so when the access or `kbs`
    filter leaves fewer than `limit` rows the search is repeated exactly (index scans off: a
    sequential or kb_id bitmap scan over the readable chunks). `exact=True` goes there directly.
    """
    if limit <= 0:
        return []
    params = dense_params(query_vec, principal=principal, kbs=kbs, limit=limit)
    ef = min(max(ef_search, limit), MAX_EF_SEARCH)
    rows: list[tuple[int, float]] = []
    if not exact:
        rows = await _dense_rows(conn, vectors, params, settings={"hnsw.ef_search": str(ef)})
    if exact or len(rows) < limit:
        rows = await _dense_rows(conn, vectors, params, settings={"enable_indexscan": "off"})
    return rows


async def _dense_rows(
    conn: AsyncConnection[Any],
    vectors: VectorAdapters,
    params: dict[str, Any],
    *,
    settings: dict[str, str],
) -> list[tuple[int, float]]:
    async with conn.transaction():
        cur = await vectors.cursor(conn)
        for name, value in settings.items():
            await cur.execute("SELECT set_config(%s, %s, true)", (name, value))
        # prepare=False: psycopg prepares a statement after 5 runs; plans must follow settings.
        await cur.execute(DENSE_SQL, params, prepare=False)
        return [(int(row[0]), float(row[1])) for row in await cur.fetchall()]


def text_query(
    terms: Sequence[str], *, principal: Principal, kbs: Sequence[str] | None, limit: int
) -> tuple[str, dict[str, Any]]:
    """The full-text SQL and its parameters for `terms` (at most MAX_TERMS are used).

    Each term becomes `plainto_tsquery('simple', term)` (which reads operators and quotes as
    plain punctuation, so no input can break the query syntax) and the terms are OR-ed: a chunk
    matches if it holds every lexeme of any one term.
    """
    used = [clean for term in terms if (clean := term.replace("\x00", ""))][:MAX_TERMS]
    params: dict[str, Any] = {f"t{i}": term for i, term in enumerate(used)}
    tsquery = " || ".join(f"plainto_tsquery('simple', %(t{i})s)" for i in range(len(used)))
    query = f"""
        SELECT c.id, ts_rank_cd(c.tsv, {tsquery}) AS rank
        FROM rag_chunks c
        WHERE c.tsv @@ ({tsquery}) AND c.kb_id IN {READABLE_KB_IDS}
        ORDER BY rank DESC, c.id
        LIMIT %(limit)s
    """  # noqa: S608 - one placeholder per term; the terms travel as parameters
    names = list(kbs) if kbs is not None else None
    params.update(limit=limit, kb_names=names, **acl_params(principal))
    return query, params


async def text(
    conn: AsyncConnection[Any],
    terms: Sequence[str],
    *,
    principal: Principal,
    kbs: Sequence[str] | None,
    limit: int,
) -> list[tuple[int, float]]:
    """(chunk id, ts_rank_cd) of the best `limit` readable chunks matching any term, best first.

    Terms are words as FullText.query_terms makes them; an empty list matches nothing.
    """
    if limit <= 0 or not any(term.replace("\x00", "") for term in terms):
        return []
    query, params = text_query(terms, principal=principal, kbs=kbs, limit=limit)
    cur = await conn.execute(query, params)
    return [(int(row[0]), float(row[1])) for row in await cur.fetchall()]


async def chunks(
    conn: AsyncConnection[Any], ids: Sequence[int], *, principal: Principal
) -> list[ChunkRow]:
    """The readable chunks among `ids`, in the order of `ids`; absent or unreadable ones are
    skipped (a chunk may be deleted between search and fetch)."""
    if not ids:
        return []
    cur = await conn.execute(_CHUNKS_SQL, {"ids": list(ids), **acl_params(principal)})
    found = {
        int(row[0]): ChunkRow(
            id=int(row[0]),
            document_id=str(row[1]),
            document_name=row[2],
            kb=row[3],
            index=row[4],
            text=row[5],
            heading=row[6],
            page_start=row[7],
            page_end=row[8],
            char_start=row[9],
            char_end=row[10],
        )
        for row in await cur.fetchall()
    }
    return [found[chunk_id] for chunk_id in ids if chunk_id in found]
