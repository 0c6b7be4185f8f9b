"""The values a document becomes on its way into the store: parsed blocks, then chunks, then hits.

Offsets are character offsets into the document's extracted text (the concatenation of its blocks,
each followed by one "\\n"), so a citation can point at the exact passage. Pages are 1-based and
known for PDFs only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DocumentFormat(enum.StrEnum):
    PDF = "pdf"
    DOCX = "docx"
    TXT = "txt"
    MARKDOWN = "markdown"
    HTML = "html"


class DocumentStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    INDEXED = "indexed"
    FAILED = "failed"


@dataclass(frozen=True)
class Block:
    """A paragraph-like run of text in reading order."""

    text: str
    offset: int  # where `text` starts in the extracted text
    page: int | None = None
    heading: str | None = None  # the heading path above it, e.g. "第一章 总则 > 第二条"


@dataclass(frozen=True)
class ParsedDocument:
    format: DocumentFormat
    blocks: tuple[Block, ...]
    title: str | None = None

    @property
    def text(self) -> str:
        """The extracted text that block offsets index into."""
        return "".join(block.text + "\n" for block in self.blocks)


@dataclass(frozen=True)
class Chunk:
    """A token-budgeted piece of a document, as stored and embedded."""

    index: int  # 0-based position in the document
    text: str
    char_start: int
    char_end: int  # exclusive
    tokens: int
    heading: str | None = None
    page_start: int | None = None
    page_end: int | None = None


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk with where it came from and how it ranked."""

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
    score: float  # fused score; higher is better
    dense_rank: int | None = None  # 1-based rank in the dense list, None if absent
    text_rank: int | None = None  # 1-based rank in the full-text list, None if absent
