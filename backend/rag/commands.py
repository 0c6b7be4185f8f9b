"""The knowledge-base commands of the CLI: `ingest`, `kb`, `search`. They talk to a running RAG worker
(`qwen-stack up` or `qwen-stack rag-worker`) at `QWEN_RAG__WORKER_URL`, acting as `--user` (default:
the admin login); the worker checks that user's role.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from backend.config import Settings
from backend.errors import KnowledgeBaseError, KnowledgeBaseNotFound
from backend.rag.client import RagClient
from backend.rag.document import DocumentStatus
from backend.rag.schemas import DocumentOut

POLL_S = 0.5
INGEST_TIMEOUT_S = 3600.0
_DONE = {DocumentStatus.INDEXED, DocumentStatus.FAILED}


def client_for(settings: Settings) -> RagClient:
    return RagClient(settings.rag.worker_url, token=settings.rag.service_token.get_secret_value())


def _acting(settings: Settings, user: str | None) -> str:
    return user or settings.ui.admin_user


async def ingest(
    settings: Settings, paths: Sequence[Path], *, kb: str, user: str | None, as_json: bool,
    out: TextIO = sys.stdout, client: RagClient | None = None,
) -> int:  # fmt: skip
    """Upload `paths` to `kb` (created if missing), then follow each file until indexed or failed.
    Exit code 0 when every file was indexed (or already was), 1 otherwise. `client` (tests)
    replaces the one built from settings; it is closed either way."""
    acting = _acting(settings, user)
    files = [p for p in paths if p.is_file()]
    missing = [str(p) for p in paths if not p.is_file()]
    client = client or client_for(settings)
    started = time.monotonic()
    try:
        try:
            await client.list_documents(kb, user=acting)
        except KnowledgeBaseNotFound:
            await client.create_kb(kb, user=acting)
        results = []
        for path in files:  # one request per file: a large batch never holds one huge body
            results.extend(await client.upload_paths(kb, [path], user=acting))
        waiting = {r.document.id: r for r in results if r.document is not None}
        final: dict[str, DocumentOut] = {}
        bar = tqdm(total=len(waiting), unit="file", desc=f"indexing into {kb}", disable=as_json)
        deadline = time.monotonic() + INGEST_TIMEOUT_S
        while len(final) < len(waiting) and time.monotonic() < deadline:
            for doc_id in [d for d in waiting if d not in final]:
                now = await client.job(doc_id, user=acting)
                if now.status in _DONE:
                    final[doc_id] = now
                    bar.update(1)
            if len(final) < len(waiting):
                await asyncio.sleep(POLL_S)
        bar.close()
    finally:
        await client.aclose()
    rows = []
    for r in results:
        doc: DocumentOut | None = final.get(r.document.id) if r.document else None
        rows.append({
            "file": r.filename, "document_id": r.document.id if r.document else None,
            "status": doc.status if doc else ("rejected" if not r.accepted else "pending"),
            "duplicate": r.duplicate, "chunks": doc.chunk_count if doc else 0,
            "error": (doc.error if doc else r.message),
        })  # fmt: skip
    ok = not missing and all(row["status"] == DocumentStatus.INDEXED for row in rows)
    summary = {
        "kb": kb, "files": len(paths), "indexed": sum(r["status"] == "indexed" for r in rows),
        "failed": len(rows) - sum(r["status"] == "indexed" for r in rows) + len(missing),
        "chunks": sum(int(r["chunks"] or 0) for r in rows), "missing": missing,
        "seconds": round(time.monotonic() - started, 2), "documents": rows,
    }  # fmt: skip
    if as_json:
        out.write(json.dumps(summary, ensure_ascii=False) + "\n")
    else:
        for row in rows:
            note = f" ({row['error']})" if row["error"] else ""
            out.write(f"{row['status']:>9}  {row['file']}  {row['chunks']} chunks{note}\n")
        for name in missing:
            out.write(f"  missing  {name}\n")
        out.write(f"{summary['indexed']}/{summary['files']} indexed in {summary['seconds']}s\n")
    return 0 if ok else 1


async def kb_command(
    settings: Settings, action: str, names: Sequence[str], *, user: str | None,
    out: TextIO = sys.stdout, client: RagClient | None = None,
) -> int:  # fmt: skip
    acting = _acting(settings, user)
    client = client or client_for(settings)
    try:
        if action == "list":
            for kb in await client.list_kbs(user=acting):
                visibility = "public" if kb.public else "private"
                out.write(f"{kb.name}\t{visibility}\t{kb.created_by}\t{kb.description}\n")
        elif action == "docs":
            if len(names) != 1:
                raise KnowledgeBaseError("usage: qwen-stack kb docs KB")
            for doc in await client.list_documents(names[0], user=acting):
                out.write(
                    f"{doc.id}\t{doc.status}\t{doc.chunk_count}\t{doc.filename}"
                    + (f"\t{doc.error}" if doc.error else "") + "\n"
                )  # fmt: skip
        elif len(names) == 1:
            await client.delete_kb(names[0], user=acting)
            out.write(f"deleted knowledge base {names[0]}\n")
        elif len(names) == 2:
            await client.delete_document(names[0], names[1], user=acting)
            out.write(f"deleted document {names[1]}\n")
        else:
            raise KnowledgeBaseError("usage: qwen-stack kb delete KB [DOCUMENT_ID]")
    finally:
        await client.aclose()
    return 0


async def search(
    settings: Settings, query: str, *, kbs: Sequence[str] | None, top_k: int, user: str | None,
    as_json: bool, out: TextIO = sys.stdout, client: RagClient | None = None,
) -> int:  # fmt: skip
    client = client or client_for(settings)
    try:
        hits = await client.retrieve(query, user=_acting(settings, user), kbs=kbs, top_k=top_k)
    finally:
        await client.aclose()
    if as_json:
        rows = [
            {
                "rank": n, "score": round(h.score, 6), "kb": h.kb, "document": h.document_name,
                "document_id": h.document_id, "chunk": h.index, "page": h.page_start,
                "heading": h.heading, "char_start": h.char_start, "char_end": h.char_end,
                "text": h.text,
            }
            for n, h in enumerate(hits, 1)
        ]  # fmt: skip
        out.write(json.dumps({"query": query, "hits": rows}, ensure_ascii=False) + "\n")
        return 0
    for n, h in enumerate(hits, 1):
        page = f" p.{h.page_start}" if h.page_start else ""
        out.write(f"[{n}] {h.score:.4f}  {h.document_name}{page}  ({h.kb})\n")
        out.write("    " + h.text[:200].replace("\n", " ") + "\n")
    return 0
