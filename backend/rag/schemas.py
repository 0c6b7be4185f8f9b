"""HTTP bodies of the RAG worker API (pydantic: this is where outside data enters and leaves).

The client (backend/rag/client.py) reads the same models, so both sides agree on one shape.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from backend.errors import DocumentRejected
from backend.rag.document import DocumentStatus, Hit
from backend.rag.records import DocumentRecord, KnowledgeBase

_NAME_PATTERN = r"^[\w\-. \u4e00-\u9fff]+$"


class CreateKnowledgeBase(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=_NAME_PATTERN)
    description: str = Field("", max_length=500)
    public: bool = True


class KnowledgeBaseOut(BaseModel):
    name: str
    description: str
    public: bool
    created_by: str
    document_count: int
    writable: bool  # whether the acting user may upload, delete and reindex here

    @classmethod
    def of(cls, kb: KnowledgeBase) -> KnowledgeBaseOut:
        return cls(
            name=kb.name, description=kb.description, public=kb.public, created_by=kb.created_by,
            document_count=kb.document_count, writable=kb.writable,
        )  # fmt: skip


class DocumentOut(BaseModel):
    id: str
    kb: str
    filename: str
    status: DocumentStatus
    progress: float
    chunk_count: int
    size_bytes: int
    format: str | None
    error_code: str | None
    error: str | None
    uploaded_by: str
    created_at: datetime
    indexed_at: datetime | None
    # What the guard found when it was indexed (flagged, still indexed); defaults keep a client
    # able to read a worker that predates them.
    guard_categories: list[str] = Field(default_factory=list)
    guard_flagged_chunks: int = 0

    @classmethod
    def of(cls, doc: DocumentRecord) -> DocumentOut:
        return cls(
            id=doc.id, kb=doc.kb, filename=doc.filename, status=doc.status,
            progress=doc.progress, chunk_count=doc.chunk_count, size_bytes=doc.size_bytes or 0,
            format=doc.format, error_code=doc.error_code, error=doc.error,
            uploaded_by=doc.uploaded_by, created_at=doc.created_at, indexed_at=doc.indexed_at,
            guard_categories=list(doc.guard_categories),
            guard_flagged_chunks=doc.guard_flagged_chunks,
        )  # fmt: skip


class UploadOut(BaseModel):
    """One file of an upload: accepted (maybe a duplicate of an earlier one) or rejected."""

    filename: str
    accepted: bool
    duplicate: bool = False
    document: DocumentOut | None = None
    reason: str | None = None
    message: str | None = None

    @classmethod
    def of_document(cls, doc: DocumentRecord, *, duplicate: bool) -> UploadOut:
        return cls(
            filename=doc.filename, accepted=True, duplicate=duplicate, document=DocumentOut.of(doc)
        )

    @classmethod
    def rejected(cls, filename: str, exc: DocumentRejected) -> UploadOut:
        return cls(
            filename=filename, accepted=False, reason=str(exc.reason), message=exc.user_message
        )


class RetrieveRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    kbs: list[str] | None = None
    top_k: int = Field(5, ge=1, le=50)


class HitOut(BaseModel):
    chunk_id: int
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
    score: float
    dense_rank: int | None
    text_rank: int | None

    def to_hit(self) -> Hit:
        return Hit(**self.model_dump())


class RetrieveResponse(BaseModel):
    hits: list[HitOut]

    @classmethod
    def of(cls, hits: list[Hit]) -> RetrieveResponse:
        return cls(hits=[HitOut(**hit.__dict__) for hit in hits])
