"""The knowledge-base CLI commands (`ingest`, `kb`, `search`) against a real RAG service."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest

from backend.errors import Forbidden
from backend.rag.api import create_app
from backend.rag.client import RagClient
from backend.rag.commands import ingest, kb_command, search
from backend.rag.demo import demo_files
from backend.rag.service import RagService
from tests.backend.rag.conftest import TOKEN


def client_of(service: RagService) -> RagClient:
    app = create_app(service.settings, service=service)
    return RagClient("http://rag", token=TOKEN, transport=httpx.ASGITransport(app=app))


@pytest.fixture(scope="module")
async def ingested(service: RagService) -> dict[str, object]:
    out = io.StringIO()
    code = await ingest(
        service.settings, demo_files(), kb="cli", user="root", as_json=True, out=out,
        client=client_of(service),
    )  # fmt: skip
    summary: dict[str, object] = json.loads(out.getvalue())
    summary["code"] = code
    return summary


async def test_ingest_indexes_every_file(ingested: dict[str, object]) -> None:
    assert ingested["code"] == 0
    assert ingested["indexed"] == ingested["files"] == len(demo_files())


async def test_ingest_reports_a_bad_file(service: RagService, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"\x7fELF" + bytes(64))
    out = io.StringIO()
    code = await ingest(
        service.settings, [bad, tmp_path / "missing.txt"], kb="cli-bad", user="root",
        as_json=True, out=out, client=client_of(service),
    )  # fmt: skip
    summary = json.loads(out.getvalue())
    assert code == 1 and summary["missing"] == [str(tmp_path / "missing.txt")]
    assert summary["documents"][0]["status"] == "rejected"


async def test_kb_list_and_docs(service: RagService, ingested: dict[str, object]) -> None:
    out = io.StringIO()
    await kb_command(service.settings, "list", [], user="alice", out=out, client=client_of(service))
    assert any(line.startswith("cli\t") for line in out.getvalue().splitlines())
    out = io.StringIO()
    await kb_command(
        service.settings, "docs", ["cli"], user="alice", out=out, client=client_of(service)
    )
    assert out.getvalue().count("\tindexed\t") == len(demo_files())


async def test_search_json_ranks_chunks(service: RagService, ingested: dict[str, object]) -> None:
    out = io.StringIO()
    await search(
        service.settings, "出差补贴 每天", kbs=["cli"], top_k=3, user="alice", as_json=True,
        out=out, client=client_of(service),
    )  # fmt: skip
    hits = json.loads(out.getvalue())["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert any("120 元" in h["text"] and h["document"] == "travel-expenses.md" for h in hits)


async def test_user_cannot_delete_a_kb(service: RagService, ingested: dict[str, object]) -> None:
    with pytest.raises(Forbidden):
        await kb_command(
            service.settings, "delete", ["cli"], user="alice", client=client_of(service)
        )
