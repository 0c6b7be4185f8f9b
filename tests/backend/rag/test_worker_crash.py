"""Two real worker processes, killed with SIGKILL at random points and restarted: every document
still ends indexed exactly once. Reproduce a run with QWEN_TEST_CRASH_SEED=<the printed seed>."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from backend.auth import Principal, Role
from backend.config import RagSettings
from backend.db import migrate, open_pool
from backend.rag.chunking import Chunker
from backend.rag.document import DocumentStatus
from backend.rag.jobs import JobQueue
from backend.rag.parsing import detect_format, parse_bytes
from backend.rag.records import KnowledgeBase
from backend.rag.storage import FileStorage
from backend.rag.store import KnowledgeStore
from tests.fixtures.documents import Heading, Para, make_docx, make_html, make_pdf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ADMIN = Principal(user="admin", role=Role.ADMIN)
INDEXED = DocumentStatus.INDEXED
DOCUMENTS = 50
KILLS = 4
CLAIM_IDLE_S = 3
SETTLE_S = 300.0  # a hang fails the test; no assertion is about speed
WORDS = (
    *("apple", "river", "mountain", "policy", "engine", "harbor", "violet", "system", "ledger"),
    *("garden", "signal", "copper", "window", "market", "winter", "lantern", "orbit", "meadow"),
    *("canyon", "thunder", "pepper", "marble", "compass"),
)


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."


def _paragraphs(rng: random.Random, n: int) -> list[str]:
    return [" ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(n)]


def _document(rng: random.Random, n: int) -> tuple[str, bytes]:
    """A file of a random format with random English text (MiniLM's vocabulary), unique by `n`."""
    paragraphs = [f"Document number {n}.", *_paragraphs(rng, rng.randint(1, 12))]
    kind = rng.choice(["txt", "txt", "md", "html", "docx", "pdf"])
    if kind == "txt":
        return f"doc{n}.txt", "\n\n".join(paragraphs).encode()
    if kind == "md":
        return f"doc{n}.md", ("# Title\n\n" + "\n\n".join(paragraphs)).encode()
    if kind == "html":
        body = "<h1>Title</h1>" + "".join(f"<p>{p}</p>" for p in paragraphs)
        return f"doc{n}.html", make_html(body=body)
    if kind == "docx":
        parts = [Heading(1, "Title"), *(Para(p) for p in paragraphs)]
        return f"doc{n}.docx", make_docx(parts)
    lines = [s for p in paragraphs for s in (p[i : i + 80] for i in range(0, len(p), 80))]
    return f"doc{n}.pdf", make_pdf([lines[i : i + 40] for i in range(0, len(lines), 40)])


class Workers:
    """`python -m backend.rag.worker` processes, each in its own process group (so a kill takes
    its parser children with it, as a crashed container would)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self._env = env
        self._logs = logs
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self._started = 0

    def start(self, slot: int) -> None:
        self._started += 1
        log = (self._logs / f"worker-{slot}-{self._started}.log").open("wb")
        self.processes[slot] = subprocess.Popen(
            [sys.executable, "-m", "backend.rag.worker"],
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill(self, slot: int) -> None:
        process = self.processes[slot]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def terminate_all(self, *, timeout_s: float) -> list[int | None]:
        """SIGTERM every worker (graceful stop); their exit codes (None: had to be killed)."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for slot, process in self.processes.items():
            try:
                codes.append(process.wait(timeout=timeout_s))
            except subprocess.TimeoutExpired:
                self.kill(slot)
                codes.append(None)
        return codes

    def kill_all(self) -> None:
        for slot in self.processes:
            self.kill(slot)

    def diagnose(self) -> str:
        """The live workers' Python stacks (faulthandler, on SIGABRT) and every log's tail."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        logs = sorted(self._logs.glob("worker-*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in logs)


@pytest.fixture
def crash_seed() -> int:
    given = os.environ.get("QWEN_TEST_CRASH_SEED")
    seed = int(given) if given else random.SystemRandom().randrange(2**32)
    print(f"crash test seed: {seed} (rerun with QWEN_TEST_CRASH_SEED={seed})")
    return seed


@pytest.fixture
def workers(
    tmp_path: Path, database: str, redis_url: str, rag_settings: RagSettings
) -> Iterator[Workers]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_")}
    env.update(
        PYTHONFAULTHANDLER="1",  # SIGABRT dumps every thread's stack (diagnose)
        QWEN_STATE_DIR=str(tmp_path / "state"),
        QWEN_DATABASE__URL=database,
        QWEN_REDIS__URL=redis_url,
        QWEN_LOG_LEVEL="INFO",
        QWEN_RAG__EMBEDDER=str(rag_settings.embedder),
        QWEN_RAG__EMBEDDING_MODEL=rag_settings.embedding_model,
        QWEN_RAG__EMBEDDING_DIM=str(rag_settings.embedding_dim),
        QWEN_RAG__EMBEDDING_POOLING=rag_settings.embedding_pooling,
        QWEN_RAG__EMBEDDING_BATCH="8",
        QWEN_RAG__EMBEDDING_MAX_LENGTH=str(rag_settings.embedding_max_length),
        QWEN_RAG__CHUNK_TOKENS=str(rag_settings.chunk_tokens),
        QWEN_RAG__CHUNK_OVERLAP_TOKENS=str(rag_settings.chunk_overlap_tokens),
        QWEN_RAG__CLAIM_IDLE_S=str(CLAIM_IDLE_S),
        QWEN_RAG__RECONCILE_INTERVAL_S="2",
        QWEN_RAG__MAX_DELIVERIES="50",  # kills must never dead-letter a document
        QWEN_RAG__CONSUMERS="1",
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    group = Workers(env, logs)
    try:
        yield group
    finally:
        group.kill_all()


@dataclass
class Library:
    """The parent's side: what the upload API writes, and what the test reads back."""

    pool: AsyncConnectionPool
    store: KnowledgeStore
    jobs: JobQueue
    storage: FileStorage
    kb: KnowledgeBase
    redis: aioredis.Redis

    async def upload(self, name: str, data: bytes) -> str:
        """As the upload API does: the file, then the row, then the job. The document id."""
        stored = self.storage.save(data, max_bytes=10 << 20)
        record, created = await self.store.add_document(
            self.kb, filename=name, content_hash=stored.sha256, size_bytes=stored.size,
            format=detect_format(data), storage_key=stored.key, uploaded_by=ADMIN.user,
        )  # fmt: skip
        assert created
        await self.jobs.enqueue(record.id)
        return record.id

    async def count(self, status: DocumentStatus) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM rag_documents WHERE status = %s", (status.value,)
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def chunks(self, document_id: str) -> list[tuple[int, str]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT idx, text FROM rag_chunks WHERE document_id = %s ORDER BY idx, id",
                (document_id,),
            )
            return [(row[0], row[1]) for row in await cur.fetchall()]

    async def holders(self) -> set[str]:
        """Consumers holding a job right now."""
        summary = await self.redis.xpending(self.jobs.stream, self.jobs.group)
        return {c["name"] for c in summary["consumers"] if int(c["pending"]) > 0}


@pytest.fixture
async def library(
    tmp_path: Path, database: str, redis_client: aioredis.Redis
) -> AsyncIterator[Library]:
    await migrate(database)
    pool = await open_pool(database, max_size=2)
    try:
        store = KnowledgeStore(pool)
        jobs = JobQueue(redis_client)
        await jobs.ensure_group()
        yield Library(
            pool=pool, store=store, jobs=jobs, storage=FileStorage(tmp_path / "state" / "kb-files"),
            kb=await store.create_kb("crash", principal=ADMIN), redis=redis_client,
        )  # fmt: skip
    finally:
        await pool.close()


def _slots_holding(workers: Workers, holders: set[str]) -> list[int]:
    """Worker slots holding a job (consumer names end in "-<pid>-<n>")."""
    return [
        slot
        for slot, process in sorted(workers.processes.items())
        if any(name.endswith(f"-{process.pid}-0") for name in holders)
    ]


async def test_killed_workers_index_every_document_once(
    library: Library,
    rag_settings: RagSettings,
    chunker: Chunker,
    workers: Workers,
    crash_seed: int,
) -> None:
    rng = random.Random(crash_seed)
    files: dict[str, bytes] = {}
    for n in range(DOCUMENTS):
        name, data = _document(rng, n)
        files[await library.upload(name, data)] = data
    workers.start(0)
    workers.start(1)
    kills = 0
    try:
        async with asyncio.timeout(SETTLE_S):
            while kills < KILLS and (done := await library.count(INDEXED)) < DOCUMENTS:
                spread = done >= kills * DOCUMENTS // (KILLS + 1)  # kills across the run
                busy = _slots_holding(workers, await library.holders()) if spread else []
                if not busy:
                    await asyncio.sleep(0.05)
                    continue
                await asyncio.sleep(rng.uniform(0.0, 1.0))  # somewhere inside the job
                slot = rng.choice(busy)
                kills += 1
                print(f"kill {kills}: worker {slot} after {done} indexed")
                workers.kill(slot)
                workers.start(slot)
            while await library.count(INDEXED) < DOCUMENTS:
                assert await library.count(DocumentStatus.FAILED) == 0
                await asyncio.sleep(0.5)
    except BaseException:
        print(workers.diagnose())
        raise
    assert kills == KILLS
    assert workers.terminate_all(timeout_s=60) == [0, 0]

    records = {d.id: d for d in await library.store.list_documents(library.kb, principal=ADMIN)}
    assert len(records) == DOCUMENTS
    retried = sorted(d.attempts for d in records.values() if d.attempts > 1)
    print(f"documents claimed more than once (attempts): {retried}")
    for document_id, data in files.items():
        record = records[document_id]
        assert record.status is INDEXED
        expected = chunker.split(parse_bytes(data, max_chars=rag_settings.parse_max_chars))
        stored = await library.chunks(document_id)
        assert [idx for idx, _ in stored] == list(range(record.chunk_count))
        assert [text for _, text in stored] == [chunk.text for chunk in expected]
    assert await library.jobs.pending() == 0
    assert await library.jobs.lag() == 0
    assert await library.jobs.dead_letters(10) == []


async def test_sigterm_lets_the_job_in_progress_finish(
    library: Library, workers: Workers, crash_seed: int
) -> None:
    rng = random.Random(crash_seed)
    paragraphs = _paragraphs(rng, 300)  # a few hundred chunks: seconds of embedding
    document_id = await library.upload("long.txt", "\n\n".join(paragraphs).encode())
    workers.start(0)
    try:
        async with asyncio.timeout(SETTLE_S):
            while not _slots_holding(workers, await library.holders()):
                await asyncio.sleep(0.05)
    except BaseException:
        print(workers.diagnose())
        raise
    assert await library.count(INDEXED) == 0  # SIGTERM arrives while the job is in progress
    assert workers.terminate_all(timeout_s=60) == [0]
    [record] = await library.store.list_documents(library.kb, principal=ADMIN)
    assert (record.id, record.status, record.attempts) == (document_id, INDEXED, 1)
    assert [idx for idx, _ in await library.chunks(document_id)] == list(range(record.chunk_count))
    assert (await library.jobs.pending(), await library.jobs.lag()) == (0, 0)
