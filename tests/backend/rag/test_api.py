"""The RAG worker's HTTP API end to end in one process: real PostgreSQL+pgvector, Redis, the parser
sandbox, FlagEmbedding on the small model and the ingestion consumers, through `RagClient`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from backend.errors import (
    AuthError,
    DocumentNotFound,
    Forbidden,
    KnowledgeBaseNotFound,
    RejectReason,
)
from backend.rag.api import create_app
from backend.rag.client import RagClient
from backend.rag.demo import DEMO_KB, demo_files, load_demo
from backend.rag.document import DocumentStatus
from backend.rag.service import RagService
from tests.backend.rag.conftest import TOKEN
from tests.backend.rag.seed import blocked_words
from tests.fixtures.documents import document_bytes, make_elf, make_large_text


async def wait_done(client: RagClient, document_id: str, *, user: str = "root") -> DocumentStatus:
    for _ in range(600):
        doc = await client.job(document_id, user=user)
        if doc.status in (DocumentStatus.INDEXED, DocumentStatus.FAILED):
            return doc.status
        await asyncio.sleep(0.2)
    raise AssertionError(f"document {document_id} still {doc.status}")


@pytest.fixture(scope="module")
async def hr(client: RagClient) -> str:
    """A public knowledge base holding the demo documents, indexed."""
    results = await load_demo(client, user="root")
    for r in results:
        assert r.document is not None
        assert await wait_done(client, r.document.id) is DocumentStatus.INDEXED
    return DEMO_KB


@pytest.fixture(scope="module")
async def private(client: RagClient) -> str:
    await client.create_kb("secret", user="kbadmin", public=False)
    results = await client.upload(
        "secret",
        [("plan.md", "# 机密\n\n代号青龙的收购计划在十二月公布。".encode())],
        user="kbadmin",
    )
    assert results[0].document is not None
    assert await wait_done(client, results[0].document.id) is DocumentStatus.INDEXED
    return "secret"


GOOD = (
    "sample.pdf",
    "pdf_named.txt",
    "sample.docx",
    "sample.html",
    "sample.md",
    "utf8.txt",
    "gb18030.txt",
)
BAD = {
    "encrypted.pdf": RejectReason.ENCRYPTED,
    "truncated.pdf": RejectReason.MALFORMED,
    "bomb.docx": RejectReason.ARCHIVE_BOMB,
    "entities.docx": RejectReason.XML_ENTITIES,
    "entities.html": RejectReason.XML_ENTITIES,
    "empty.txt": RejectReason.EMPTY,
    "elf_named.pdf": RejectReason.UNSUPPORTED_TYPE,
    "png_named.pdf": RejectReason.UNSUPPORTED_TYPE,
}


@pytest.fixture(scope="module")
async def mixed(client: RagClient) -> dict[str, tuple[str, str | None, str | None]]:
    """Every builder's file uploaded in one request: name -> (status, error code, message)."""
    await client.create_kb("mixed", user="kbadmin")
    files = document_bytes()
    results = await client.upload("mixed", [(n, files[n]) for n in (*GOOD, *BAD)], user="kbadmin")
    outcome: dict[str, tuple[str, str | None, str | None]] = {}
    for r in results:
        if r.document is None:
            outcome[r.filename] = ("rejected", r.reason, r.message)
            continue
        await wait_done(client, r.document.id)
        doc = await client.job(r.document.id, user="kbadmin")
        outcome[r.filename] = (doc.status, doc.error_code, doc.error)
    return outcome


async def test_every_format_ingests(mixed: dict[str, tuple[str, str | None, str | None]]) -> None:
    assert {name: mixed[name][0] for name in GOOD} == dict.fromkeys(GOOD, DocumentStatus.INDEXED)


@pytest.mark.parametrize("name", sorted(BAD))
async def test_bad_file_gets_its_clear_error(
    mixed: dict[str, tuple[str, str | None, str | None]], name: str
) -> None:
    status, code, message = mixed[name]
    assert status in ("rejected", DocumentStatus.FAILED) and code == BAD[name]
    assert message and message.endswith("。") and "/" not in message


async def test_demo_documents_index(client: RagClient, hr: str) -> None:
    docs = await client.list_documents(hr, user="alice")
    assert len(docs) == len(demo_files()) and all(d.chunk_count > 0 for d in docs)


async def test_documents_show_guard_flags(client: RagClient) -> None:
    await client.create_kb("flags", user="kbadmin")
    category, word = sorted(blocked_words().items())[0]
    files = [
        ("ad.txt", f"群里有人推销{word}，请勿相信。".encode()),
        ("menu.txt", "食堂周四供应面条。".encode()),
    ]
    for r in await client.upload("flags", files, user="kbadmin"):
        assert r.document is not None
        assert await wait_done(client, r.document.id, user="kbadmin") is DocumentStatus.INDEXED
    docs = {d.filename: d for d in await client.list_documents("flags", user="kbadmin")}
    flagged, clean = docs["ad.txt"], docs["menu.txt"]
    assert (flagged.guard_categories, flagged.guard_flagged_chunks) == ([category], 1)
    assert (clean.guard_categories, clean.guard_flagged_chunks) == ([], 0)


async def test_reupload_is_a_duplicate(client: RagClient, hr: str) -> None:
    path = demo_files()[0]
    result = (await client.upload(hr, [("again.md", path.read_bytes())], user="root"))[0]
    assert result.accepted and result.duplicate


async def test_bad_file_is_refused_alone(client: RagClient, hr: str) -> None:
    results = await client.upload(
        hr, [("report.pdf", make_elf()), ("ok.txt", "新的制度：周五下午茶。".encode())], user="root"
    )
    assert (results[0].accepted, results[0].reason) == (False, RejectReason.UNSUPPORTED_TYPE)
    assert results[1].accepted and results[0].message and "不支持" in results[0].message


async def test_oversized_file_is_refused(client: RagClient, hr: str) -> None:
    result = (await client.upload(hr, [("big.txt", make_large_text(2))], user="root"))[0]
    assert (result.accepted, result.reason) == (False, RejectReason.TOO_LARGE)


async def test_empty_file_is_refused(client: RagClient, hr: str) -> None:
    result = (await client.upload(hr, [("empty.txt", b"")], user="root"))[0]
    assert result.reason == RejectReason.EMPTY


async def test_hostile_name_stays_a_name(client: RagClient, service: RagService, hr: str) -> None:
    name = "../../../etc/\u202epasswd.txt"
    result = (await client.upload(hr, [(name, "恶意文件名测试内容。".encode())], user="root"))[0]
    assert result.document is not None and "/" not in result.document.filename
    root = service.settings.rag_storage_dir.resolve()
    assert not (root.parent.parent / "etc").exists()
    assert all(p.resolve().is_relative_to(root) for p in root.rglob("*"))


async def test_user_cannot_upload(client: RagClient, hr: str) -> None:
    with pytest.raises(Forbidden):
        await client.upload(hr, [("x.txt", "普通用户上传。".encode())], user="alice")


async def test_user_cannot_create_kb(client: RagClient) -> None:
    with pytest.raises(Forbidden):
        await client.create_kb("mine", user="alice")


async def test_user_cannot_delete_documents(client: RagClient, hr: str) -> None:
    doc = (await client.list_documents(hr, user="alice"))[0]
    with pytest.raises(Forbidden):
        await client.delete_document(hr, doc.id, user="alice")


async def test_wrong_token_is_refused(service: RagService) -> None:
    app = create_app(service.settings, service=service)
    bad = RagClient("http://rag", token="nope", transport=httpx.ASGITransport(app=app))
    with pytest.raises(AuthError):
        await bad.list_kbs(user="root")
    await bad.aclose()


async def test_unknown_user_is_refused(client: RagClient) -> None:
    with pytest.raises(Forbidden):
        await client.list_kbs(user="mallory")


async def test_private_kb_is_invisible(client: RagClient, private: str) -> None:
    assert private not in [kb.name for kb in await client.list_kbs(user="bob")]
    with pytest.raises(KnowledgeBaseNotFound):
        await client.list_documents(private, user="bob")


async def test_private_chunks_never_retrieved(client: RagClient, private: str, hr: str) -> None:
    hits = await client.retrieve("青龙 收购计划", user="bob", top_k=20)
    assert all(h.kb != private for h in hits)
    named = await client.retrieve("青龙", user="bob", kbs=[private])
    nonexistent = await client.retrieve("青龙", user="bob", kbs=["no-such-kb"])
    assert named == nonexistent == []  # indistinguishable from a knowledge base that is not there


async def test_owner_retrieves_private_chunks(client: RagClient, private: str) -> None:
    hits = await client.retrieve("青龙 收购计划", user="kbadmin", kbs=[private])
    assert hits and "青龙" in hits[0].text


async def test_chinese_keywords_find_their_passage(client: RagClient, hr: str) -> None:
    hits = await client.retrieve("出差住宿标准 每晚 上海", user="alice", kbs=[hr], top_k=3)
    best_text = next(h for h in hits if h.text_rank == 1)  # the full-text side's first
    assert best_text.document_name == "travel-expenses.md" and "600" in best_text.text


async def test_hits_carry_citation_anchors(client: RagClient, hr: str) -> None:
    hit = (await client.retrieve("年假 顺延", user="alice", kbs=[hr], top_k=1))[0]
    assert hit.document_name == "employee-handbook.md" and hit.heading and "年假" in hit.text
    assert hit.char_end > hit.char_start


async def test_delete_document_removes_it(client: RagClient, hr: str) -> None:
    doc = (
        await client.upload(hr, [("tmp.txt", "临时文件：食堂周三供应饺子。".encode())], user="root")
    )[0]
    assert (
        doc.document is not None
        and await wait_done(client, doc.document.id) is DocumentStatus.INDEXED
    )
    await client.delete_document(hr, doc.document.id, user="root")
    with pytest.raises(DocumentNotFound):
        await client.job(doc.document.id, user="root")
    assert all(
        "饺子" not in h.text for h in await client.retrieve("食堂 饺子", user="root", kbs=[hr])
    )


async def test_reindex_indexes_again(client: RagClient, hr: str) -> None:
    doc = (await client.list_documents(hr, user="root"))[0]
    again = await client.reindex(hr, doc.id, user="root")
    assert again.status is DocumentStatus.QUEUED
    assert await wait_done(client, doc.id) is DocumentStatus.INDEXED


async def test_errors_carry_no_internals(service: RagService) -> None:
    app = create_app(service.settings, service=service)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://rag"
    ) as http:
        response = await http.get(
            "/v1/kbs/nope/documents",
            headers={"Authorization": f"Bearer {TOKEN}", "X-Qwen-User": "root"},
        )
    assert response.status_code == 404 and set(response.json()) == {"error", "message"}


async def test_openapi_lists_the_routes(service: RagService) -> None:
    app = create_app(service.settings, service=service)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://rag"
    ) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/v1/retrieve", "/v1/kbs", "/v1/kbs/{kb}/documents", "/v1/jobs/{document_id}"} <= set(
        paths
    )


async def test_metrics_count_uploads(service: RagService, hr: str) -> None:
    text = service.metrics.render().decode()
    assert 'qwen_rag_uploads_total{outcome="queued"}' in text
    for stage in ("parse", "chunk", "embed", "segment", "write"):
        assert f'qwen_rag_ingest_stage_seconds_count{{stage="{stage}"}}' in text
    assert "qwen_rag_chunks_indexed_total" in text


def test_storage_is_content_addressed(service: RagService) -> None:
    files = [p for p in Path(service.settings.rag_storage_dir).rglob("*") if p.is_file()]
    assert files and all(len(p.name) == 64 for p in files if not p.name.startswith("."))
