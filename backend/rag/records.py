"""The rows of the knowledge-base store as values: knowledge bases, documents, a worker's claim.

Each record is built from a row selected with the column list defined beside it, so every query
that returns one selects the same columns in the same order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from backend.rag.document import DocumentFormat, DocumentStatus


class KbAccess(enum.StrEnum):
    """What a grant lets a user do with a knowledge base (role `user` never writes)."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class KnowledgeBase:
    """A knowledge base as one principal sees it: `writable` is whether that principal may upload,
    delete and reindex in it."""

    id: str
    name: str
    description: str
    public: bool
    created_by: str
    created_at: datetime
    document_count: int
    writable: bool


@dataclass(frozen=True)
class DocumentRecord:
    """A document and its indexing state. `progress` is 0..1; `error` is the Chinese message shown
    to users, `error_code` a stable machine code (e.g. a RejectReason). `guard_categories` (sorted)
    and `guard_flagged_chunks`: the lexicon categories its chunks hit when it was last indexed, and
    how many chunks hit any (none before it is indexed)."""

    id: str
    kb: str  # the knowledge base's name
    kb_id: str
    filename: str
    status: DocumentStatus
    error_code: str | None
    error: str | None
    progress: float
    chunk_count: int
    attempts: int
    size_bytes: int
    format: DocumentFormat | None
    storage_key: str
    content_hash: str
    uploaded_by: str
    created_at: datetime
    updated_at: datetime
    indexed_at: datetime | None
    guard_categories: tuple[str, ...]
    guard_flagged_chunks: int


@dataclass(frozen=True)
class Claim:
    """A worker's lease on one document. Writes made under it (`finish`, `fail`, `set_progress`,
    `renew`) succeed only while `token` is still the document's lease token: a document requeued or
    claimed by another worker after the lease ran out fences the old claim off."""

    document: DocumentRecord
    token: str
    lease_until: datetime


# `d` is rag_documents, `k` the joined rag_kbs.
DOCUMENT_COLUMNS = (
    "d.id, k.name, d.kb_id, d.filename, d.status, d.error_code, d.error, d.progress,"
    " d.chunk_count, d.attempts, d.size_bytes, d.format, d.storage_key, d.content_hash,"
    " d.uploaded_by, d.created_at, d.updated_at, d.indexed_at, d.guard_categories,"
    " d.guard_flagged_chunks"
)


def document_from_row(row: tuple[Any, ...]) -> DocumentRecord:
    """A DocumentRecord from a row of DOCUMENT_COLUMNS."""
    return DocumentRecord(
        id=str(row[0]),
        kb=row[1],
        kb_id=str(row[2]),
        filename=row[3],
        status=DocumentStatus(row[4]),
        error_code=row[5],
        error=row[6],
        progress=float(row[7]),
        chunk_count=row[8],
        attempts=row[9],
        size_bytes=row[10],
        format=DocumentFormat(row[11]) if row[11] is not None else None,
        storage_key=row[12],
        content_hash=row[13],
        uploaded_by=row[14],
        created_at=row[15],
        updated_at=row[16],
        indexed_at=row[17],
        guard_categories=tuple(row[18]),
        guard_flagged_chunks=row[19],
    )


# `k` is rag_kbs; the caller appends the principal's `writable` flag as the last column.
KB_COLUMNS = (
    "k.id, k.name, k.description, k.public, k.created_by, k.created_at,"
    " (SELECT count(*) FROM rag_documents d WHERE d.kb_id = k.id)"
)


def kb_from_row(row: tuple[Any, ...]) -> KnowledgeBase:
    """A KnowledgeBase from a row of KB_COLUMNS followed by the writable flag."""
    return KnowledgeBase(
        id=str(row[0]),
        name=row[1],
        description=row[2],
        public=row[3],
        created_by=row[4],
        created_at=row[5],
        document_count=row[6],
        writable=bool(row[7]),
    )
