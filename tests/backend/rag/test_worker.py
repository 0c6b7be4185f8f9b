from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from backend.auth import Principal, Role
from backend.config import DatabaseSettings, GuardSettings, RagSettings, RedisSettings, Settings
from backend.db import migrate, open_pool
from backend.errors import ConfigError, DocumentRejected, RejectReason
from backend.guard import LexiconStore, builtin_lexicon_dir
from backend.guard.segment import jieba_segmenter
from backend.metrics import RagMetrics
from backend.rag.chunking import Chunker
from backend.rag.document import DocumentStatus, ParsedDocument
from backend.rag.embedding import FlagEmbedder
from backend.rag.fulltext import FullText
from backend.rag.indexer import MatcherProvider, Parser
from backend.rag.ingest import DEAD_LETTER_CODE, DEAD_LETTER_MESSAGE, IngestWorker, Outcome
from backend.rag.jobs import JobQueue
from backend.rag.parsing import detect_format
from backend.rag.records import Claim, DocumentRecord, KnowledgeBase
from backend.rag.sandbox import ParseLimits, SandboxParser
from backend.rag.storage import FileStorage, safe_display_name
from backend.rag.store import KnowledgeStore
from backend.rag.worker import Reconciler, build_worker
from tests.backend.rag.seed import blocked_words
from tests.fixtures.documents import (
    make_docx,
    make_encrypted_pdf,
    make_html,
    make_markdown,
    make_pdf,
    make_txt,
)

ADMIN = Principal(user="admin", role=Role.ADMIN)
LEASE_S = 0.6
RECLAIM_IDLE_S = 1.2
SETTLE_S = 120.0  # upper bound on waiting for documents to settle (a hang fails, never a speed)


@dataclass
class Stack:
    pool: AsyncConnectionPool
    store: KnowledgeStore
    jobs: JobQueue
    storage: FileStorage
    kb: KnowledgeBase
    parser: SandboxParser
    chunker: Chunker
    embedder: FlagEmbedder
    fulltext: FullText

    def worker(
        self,
        consumer: str = "w1",
        *,
        parser: Parser | None = None,
        store: KnowledgeStore | None = None,
        max_deliveries: int = 2,
        metrics: RagMetrics | None = None,
        guard: MatcherProvider | None = None,
    ) -> IngestWorker:
        return IngestWorker(
            store or self.store, self.jobs, self.storage, parser or self.parser, self.chunker,
            self.embedder, self.fulltext, consumer=consumer, lease_s=LEASE_S,
            reclaim_idle_s=RECLAIM_IDLE_S, max_deliveries=max_deliveries, embed_batch=4,
            guard=guard, metrics=metrics,
        )  # fmt: skip

    async def upload(self, name: str, data: bytes, *, enqueue: bool = True) -> DocumentRecord:
        """What the upload API does: file to storage, then the row, then the job."""
        stored = self.storage.save(data, max_bytes=10 << 20)
        record, created = await self.store.add_document(
            self.kb, filename=safe_display_name(name), content_hash=stored.sha256,
            size_bytes=stored.size, format=detect_format(data), storage_key=stored.key,
            uploaded_by=ADMIN.user,
        )  # fmt: skip
        assert created
        if enqueue:
            await self.jobs.enqueue(record.id)
        return record

    async def document(self, document_id: str) -> DocumentRecord:
        return await self.store.get_document(document_id, principal=ADMIN)

    async def chunk_indexes(self, document_id: str) -> list[int]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT idx FROM rag_chunks WHERE document_id = %s ORDER BY idx", (document_id,)
            )
            return [row[0] for row in await cur.fetchall()]

    async def settle(self, ids: Iterable[str], *workers: IngestWorker) -> dict[str, DocumentRecord]:
        """Run `workers` until every document is indexed or failed; the final records."""
        stop = asyncio.Event()
        tasks = [asyncio.create_task(worker.run(stop)) for worker in workers]
        try:
            async with asyncio.timeout(SETTLE_S):
                while True:
                    records = {i: await self.document(i) for i in ids}
                    final = (DocumentStatus.INDEXED, DocumentStatus.FAILED)
                    if all(r.status in final for r in records.values()):
                        return records
                    await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*tasks)


@pytest.fixture(scope="module")
def fulltext(tmp_path_factory: pytest.TempPathFactory) -> FullText:
    return FullText(jieba_segmenter(cache_dir=tmp_path_factory.mktemp("jieba")))


@pytest.fixture
async def pool(database: str) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(database)
    opened = await open_pool(database, max_size=6)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def stack(
    pool: AsyncConnectionPool,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    rag_settings: RagSettings,
    chunker: Chunker,
    embedder: FlagEmbedder,
    fulltext: FullText,
) -> AsyncIterator[Stack]:
    store = KnowledgeStore(pool)
    await store.ensure_embedding(model=embedder.model_name, dim=embedder.dim)
    jobs = JobQueue(redis_client)
    await jobs.ensure_group()
    kb = await store.create_kb("手册", principal=ADMIN)
    parser = SandboxParser(ParseLimits.from_settings(rag_settings))
    try:
        yield Stack(
            pool=pool, store=store, jobs=jobs, storage=FileStorage(tmp_path / "files"), kb=kb,
            parser=parser, chunker=chunker, embedder=embedder, fulltext=fulltext,
        )  # fmt: skip
    finally:
        parser.close()


MIXED = {
    "notes.txt": make_txt(),
    "手册.md": make_markdown(),
    "policy.docx": make_docx(),
    "page.html": make_html(),
    "report.pdf": make_pdf(title="Report"),
}


@pytest.fixture(scope="module")
def lexicon(tmp_path_factory: pytest.TempPathFactory) -> LexiconStore:
    cache = tmp_path_factory.mktemp("guard-jieba")
    return LexiconStore(builtin_lexicon_dir(), segmenter=jieba_segmenter(cache_dir=cache))


async def _assert_indexed_once(stack: Stack, record: DocumentRecord) -> None:
    assert record.status is DocumentStatus.INDEXED, (record.filename, record.error_code)
    assert record.chunk_count > 0
    assert record.progress == 1
    assert await stack.chunk_indexes(record.id) == list(range(record.chunk_count))


async def test_mixed_formats_are_indexed(stack: Stack) -> None:
    ids = [(await stack.upload(name, data)).id for name, data in MIXED.items()]
    records = await stack.settle(ids, stack.worker())
    for record in records.values():
        await _assert_indexed_once(stack, record)
        assert record.attempts == 1
    assert (await stack.jobs.pending(), await stack.jobs.lag()) == (0, 0)
    assert await stack.jobs.dead_letters(10) == []


async def test_document_with_blocked_words_is_indexed_and_flagged(
    stack: Stack, lexicon: LexiconStore
) -> None:
    (first, word), (second, other) = sorted(blocked_words().items())[:2]
    clean = "这是一段普通的中文文本，用于测试内容检查。" * 8 + "\n\n"
    text = clean * 4 + f"附录：有人在群里推销{word}。\n\n另有人提到{other}。\n"
    record = await stack.upload("flagged.txt", text.encode())
    records = await stack.settle([record.id], stack.worker(guard=lexicon.current))
    done = records[record.id]
    await _assert_indexed_once(stack, done)
    assert done.guard_categories == (first, second)
    async with stack.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM rag_chunks WHERE document_id = %s"
            " AND (strpos(text, %s) > 0 OR strpos(text, %s) > 0)",
            (record.id, word, other),
        )
        row = await cur.fetchone()
    assert row is not None and 1 <= done.guard_flagged_chunks == row[0] < done.chunk_count


async def test_clean_document_is_not_flagged(stack: Stack, lexicon: LexiconStore) -> None:
    record = await stack.upload("notes.txt", make_txt())
    done = (await stack.settle([record.id], stack.worker(guard=lexicon.current)))[record.id]
    await _assert_indexed_once(stack, done)
    assert (done.guard_categories, done.guard_flagged_chunks) == ((), 0)


async def test_rejected_file_fails_with_its_code(stack: Stack) -> None:
    bad = await stack.upload("locked.pdf", make_encrypted_pdf())
    good = await stack.upload("notes.txt", make_txt())
    records = await stack.settle([bad.id, good.id], stack.worker())
    failed = records[bad.id]
    assert failed.status is DocumentStatus.FAILED
    assert failed.error_code == RejectReason.ENCRYPTED
    assert failed.error == DocumentRejected(RejectReason.ENCRYPTED).user_message
    assert failed.attempts == 1  # a permanent error is not retried
    await _assert_indexed_once(stack, records[good.id])
    assert await stack.jobs.pending() == 0
    assert await stack.jobs.dead_letters(10) == []


async def test_poison_job_is_dead_lettered(stack: Stack) -> None:
    poison = await stack.upload("lost.txt", b"this file will vanish from storage", enqueue=False)
    stack.storage.delete(poison.storage_key)  # every attempt now raises FileNotFoundError
    await stack.jobs.enqueue(poison.id)
    good = await stack.upload("page.html", make_html())
    metrics = RagMetrics()
    worker = stack.worker(max_deliveries=2, metrics=metrics)
    records = await stack.settle([poison.id, good.id], worker)
    failed = records[poison.id]
    assert failed.status is DocumentStatus.FAILED
    assert (failed.error_code, failed.error) == (DEAD_LETTER_CODE, DEAD_LETTER_MESSAGE)
    assert failed.attempts == 2
    await _assert_indexed_once(stack, records[good.id])
    [letter] = await stack.jobs.dead_letters(10)
    assert (letter.document_id, letter.deliveries) == (poison.id, 3)
    assert (await stack.jobs.pending(), await stack.jobs.lag()) == (0, 0)
    sample = metrics.registry.get_sample_value
    assert sample("qwen_rag_documents_total", {"outcome": "retry"}) == 2
    assert sample("qwen_rag_documents_total", {"outcome": "dead_lettered"}) == 1
    assert sample("qwen_rag_documents_total", {"outcome": "indexed"}) == 1
    assert sample("qwen_rag_dead_letters_total") == 1
    assert sample("qwen_rag_chunks_indexed_total") == records[good.id].chunk_count


async def test_database_outage_does_not_count_as_a_delivery(stack: Stack, database: str) -> None:
    record = await stack.upload("notes.txt", make_txt())
    down = await open_pool(database, max_size=1)
    await down.close()  # every call now raises PoolClosed, as while PostgreSQL is down
    outage = stack.worker(store=KnowledgeStore(down), max_deliveries=2)
    for _ in range(4):
        job = await stack.jobs.next("w1", block_ms=0, reclaim_idle_ms=0)
        assert job is not None and job.deliveries == 1
        assert await outage.process(job) is Outcome.UNAVAILABLE
    records = await stack.settle([record.id], stack.worker())
    await _assert_indexed_once(stack, records[record.id])
    assert records[record.id].attempts == 1
    assert await stack.jobs.dead_letters(10) == []


async def test_duplicate_job_is_skipped(stack: Stack) -> None:
    record = await stack.upload("notes.txt", make_txt())
    await stack.jobs.enqueue(record.id)
    worker = stack.worker()
    outcomes = []
    while (job := await stack.jobs.next("w1", block_ms=0, reclaim_idle_ms=60_000)) is not None:
        outcomes.append(await worker.process(job))
    assert outcomes == [Outcome.INDEXED, Outcome.SKIPPED]
    await _assert_indexed_once(stack, await stack.document(record.id))
    assert await stack.jobs.pending() == 0


async def test_job_for_deleted_document_is_acked(stack: Stack) -> None:
    record = await stack.upload("notes.txt", make_txt())
    await stack.store.delete_document(record.id, principal=ADMIN)
    job = await stack.jobs.next("w1", block_ms=0, reclaim_idle_ms=60_000)
    assert job is not None
    assert await stack.worker().process(job) is Outcome.SKIPPED
    assert await stack.jobs.pending() == 0


class _RequeueingParser:
    """A real parser; before parsing, an admin asks for the document to be indexed again."""

    def __init__(self, stack: Stack, document_id: str) -> None:
        self._stack, self._document_id = stack, document_id

    async def parse(self, path: Path) -> ParsedDocument:
        await self._stack.store.requeue(self._document_id, principal=ADMIN)
        await self._stack.jobs.enqueue(self._document_id)
        return await self._stack.parser.parse(path)

    def close(self) -> None:
        pass  # the stack's parser is closed by the fixture


async def test_lost_lease_discards_work(stack: Stack) -> None:
    record = await stack.upload("notes.txt", make_txt())
    job = await stack.jobs.next("w1", block_ms=0, reclaim_idle_ms=60_000)
    assert job is not None
    fenced = stack.worker(parser=_RequeueingParser(stack, record.id))
    assert await fenced.process(job) is Outcome.FENCED
    assert await stack.chunk_indexes(record.id) == []
    records = await stack.settle([record.id], stack.worker())
    await _assert_indexed_once(stack, records[record.id])
    assert await stack.jobs.pending() == 0


async def test_crashed_consumers_job_is_reclaimed(stack: Stack) -> None:
    record = await stack.upload("policy.docx", make_docx())
    job = await stack.jobs.next("crashed", block_ms=0, reclaim_idle_ms=60_000)
    assert job is not None
    assert await stack.store.claim(record.id, lease_s=LEASE_S) is not None  # then it died
    records = await stack.settle([record.id], stack.worker("w2"))
    await _assert_indexed_once(stack, records[record.id])
    assert records[record.id].attempts == 2
    assert await stack.jobs.pending() == 0


class _SlowParser:
    """A real parser that is slow: it parses only once `release` is set."""

    def __init__(self, parser: Parser) -> None:
        self._parser = parser
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def parse(self, path: Path) -> ParsedDocument:
        self.started.set()
        await self.release.wait()
        return await self._parser.parse(path)

    def close(self) -> None:
        self._parser.close()


async def test_heartbeat_keeps_a_slow_job(stack: Stack) -> None:
    record = await stack.upload("notes.txt", make_txt())
    slow = _SlowParser(stack.parser)
    job = await stack.jobs.next("slow", block_ms=0, reclaim_idle_ms=60_000)
    assert job is not None
    working = asyncio.create_task(stack.worker("slow", parser=slow).process(job))
    await slow.started.wait()
    for _ in range(4):  # well past the reclaim idle time and the lease, in all
        await asyncio.sleep(RECLAIM_IDLE_S / 2)
        assert await stack.jobs.next("other", block_ms=0, reclaim_idle_ms=1200) is None
        assert await stack.store.claim(record.id, lease_s=LEASE_S) is None
    slow.release.set()
    assert await working is Outcome.INDEXED
    done = await stack.document(record.id)
    await _assert_indexed_once(stack, done)
    assert done.attempts == 1


class _StuckRenewStore(KnowledgeStore):
    """A store whose lease renewal hangs until `gate` opens, and that loses a cancellation
    arriving meanwhile (as Python 3.11's asyncio.wait_for inside a client can)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        super().__init__(pool)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def renew(self, held: Claim, *, lease_s: float) -> bool:
        self.entered.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            return True
        return await super().renew(held, lease_s=lease_s)


class _AfterRenewStarts:
    """A real parser that starts once the heartbeat is inside a renewal."""

    def __init__(self, parser: Parser, store: _StuckRenewStore) -> None:
        self._parser, self._store = parser, store

    async def parse(self, path: Path) -> ParsedDocument:
        await self._store.entered.wait()
        return await self._parser.parse(path)

    def close(self) -> None:
        self._parser.close()


async def test_stuck_heartbeat_does_not_hold_up_the_job(stack: Stack) -> None:
    record = await stack.upload("notes.txt", make_txt())
    store = _StuckRenewStore(stack.pool)
    worker = stack.worker(store=store, parser=_AfterRenewStarts(stack.parser, store))
    job = await stack.jobs.next("w1", block_ms=0, reclaim_idle_ms=60_000)
    assert job is not None
    try:
        assert await worker.process(job) is Outcome.INDEXED
    finally:
        store.gate.set()
    await _assert_indexed_once(stack, await stack.document(record.id))


async def test_reconciler_requeues_a_lost_job(stack: Stack) -> None:
    lost = await stack.upload("notes.txt", make_txt(), enqueue=False)
    waiting = await stack.upload("page.html", make_html())
    metrics = RagMetrics()
    reconciler = Reconciler(
        stack.store, stack.jobs, interval_s=60, queued_for_s=0, processing_grace_s=60,
        metrics=metrics,
    )  # fmt: skip
    assert await reconciler.reconcile() == [lost.id]
    assert metrics.registry.get_sample_value("qwen_rag_stream_lag") == 2
    assert metrics.registry.get_sample_value("qwen_rag_stream_pending") == 0
    assert await reconciler.reconcile() == []  # its job is in the stream now
    assert await stack.jobs.document_ids() == {lost.id, waiting.id}
    records = await stack.settle([lost.id, waiting.id], stack.worker())
    for record in records.values():
        await _assert_indexed_once(stack, record)


async def test_reconciler_ignores_fresh_documents(stack: Stack) -> None:
    await stack.upload("notes.txt", make_txt(), enqueue=False)
    reconciler = Reconciler(
        stack.store, stack.jobs, interval_s=60, queued_for_s=3600, processing_grace_s=3600
    )
    assert await reconciler.reconcile() == []


def test_lease_must_be_shorter_than_reclaim(stack: Stack) -> None:
    with pytest.raises(ConfigError):
        IngestWorker(
            stack.store, stack.jobs, stack.storage, stack.parser, stack.chunker, stack.embedder,
            stack.fulltext, consumer="w", lease_s=5, reclaim_idle_s=5, max_deliveries=1,
            embed_batch=1,
        )  # fmt: skip


async def test_build_worker_from_settings(
    stack: Stack,
    pool: AsyncConnectionPool,
    redis_client: aioredis.Redis,
    rag_settings: RagSettings,
    embedder: FlagEmbedder,
    tmp_path: Path,
    database: str,
    redis_url: str,
) -> None:
    settings = Settings(
        state_dir=tmp_path / "state",
        database=DatabaseSettings(url=database),
        redis=RedisSettings(url=redis_url),
        rag=rag_settings.model_copy(update={"storage_dir": tmp_path / "files"}),
    )
    worker = await build_worker(
        settings, pool=pool, redis=redis_client, consumer="built", embedder=embedder
    )
    record = await stack.upload("report.pdf", make_pdf())
    records = await stack.settle([record.id], worker)
    await _assert_indexed_once(stack, records[record.id])


async def test_built_worker_flags_with_the_settings_lexicon(
    stack: Stack,
    pool: AsyncConnectionPool,
    redis_client: aioredis.Redis,
    rag_settings: RagSettings,
    embedder: FlagEmbedder,
    tmp_path: Path,
    database: str,
    redis_url: str,
) -> None:
    lexicons = tmp_path / "lexicons"
    lexicons.mkdir()
    (lexicons / "site.tsv").write_text("青龙计划\t机密\tflag\n", encoding="utf-8")
    settings = Settings(
        state_dir=tmp_path / "state",
        database=DatabaseSettings(url=database),
        redis=RedisSettings(url=redis_url),
        rag=rag_settings.model_copy(update={"storage_dir": tmp_path / "files"}),
        guard=GuardSettings(lexicon_dir=lexicons),
    )
    worker = await build_worker(
        settings, pool=pool, redis=redis_client, consumer="built", embedder=embedder
    )
    record = await stack.upload("plan.txt", "代号青龙计划的收购在十二月公布。".encode())
    done = (await stack.settle([record.id], worker))[record.id]
    await _assert_indexed_once(stack, done)
    assert (done.guard_categories, done.guard_flagged_chunks) == (("机密",), 1)


async def test_warm_up_starts_a_zygote_and_leaves_nothing_behind(
    stack: Stack, lexicon: LexiconStore
) -> None:
    worker = stack.worker("w", guard=lexicon.current)
    assert stack.parser.zygote_pids == []
    await worker.warm_up()
    [zygote] = stack.parser.zygote_pids
    # the zygote is reused by the first document: no second interpreter starts
    record = await stack.upload("notes.txt", make_txt())
    job = await stack.jobs.next("w", block_ms=100, reclaim_idle_ms=60_000)
    assert job is not None and await worker.process(job) is Outcome.INDEXED
    assert stack.parser.zygote_pids == [zygote]
    assert (await stack.store.get_document(record.id, principal=ADMIN)).chunk_count > 0


async def test_failed_warm_up_is_logged_not_raised(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = SandboxParser(
        ParseLimits(cpu_s=5, memory_mb=256, max_bytes=1000, max_chars=1000),
        interpreter=str(tmp_path / "missing-python"),
    )
    await stack.worker("w", parser=broken).warm_up()
    assert "warm-up failed" in caplog.text
