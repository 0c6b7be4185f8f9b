"""How the admin document list shows a document: status, chunks and what the guard flagged."""

from __future__ import annotations

from datetime import UTC, datetime

from backend.rag.document import DocumentStatus
from backend.rag.schemas import DocumentOut
from chat_ui.knowledge import _line


def document(**changes: object) -> DocumentOut:
    now = datetime.now(UTC)
    fields: dict[str, object] = {
        "id": "d1", "kb": "hr", "filename": "手册.md", "status": DocumentStatus.INDEXED,
        "progress": 1.0, "chunk_count": 12, "size_bytes": 100, "format": "md",
        "error_code": None, "error": None, "uploaded_by": "root", "created_at": now,
        "indexed_at": now,
    }  # fmt: skip
    return DocumentOut.model_validate(fields | changes)


def test_clean_document_line() -> None:
    assert _line(document()) == "【已入库】手册.md（12 个片段）"


def test_flagged_document_line_names_categories() -> None:
    flagged = document(guard_categories=["广告引流", "赌博"], guard_flagged_chunks=3)
    assert _line(flagged) == "【已入库】手册.md（12 个片段；其中 3 个含敏感内容：广告引流、赌博）"


def test_failed_document_line_shows_error() -> None:
    failed = document(status=DocumentStatus.FAILED, error="文件已加密，无法读取。")
    assert _line(failed) == "【失败】手册.md：文件已加密，无法读取。"
