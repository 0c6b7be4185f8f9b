"""The RAG ingestion worker process: consumers (backend/rag/ingest.py), the reconciler, wiring.

    python -m backend.rag.worker

runs `settings.rag.consumers` consumers and one reconciler until SIGTERM or SIGINT. It needs
QWEN_DATABASE__URL and QWEN_REDIS__URL (`qwen-stack up` provides embedded servers and sets both).
On the first signal it stops taking jobs and lets the jobs in progress finish for up to
`SHUTDOWN_GRACE_S`; jobs still running then are abandoned un-acknowledged (another consumer
reclaims them). A second signal abandons them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
from typing import Any

from psycopg_pool import AsyncConnectionPool
from redis import asyncio as aioredis

from backend.config import Settings
from backend.db import migrate, open_pool
from backend.errors import ConfigError, QwenStackError
from backend.guard import LexiconStore, builtin_lexicon_dir, jieba_segmenter
from backend.metrics import RagMetrics
from backend.rag.chunking import Chunker
from backend.rag.embedding import Embedder, load_embedder
from backend.rag.fulltext import FullText
from backend.rag.indexer import cpu_lane
from backend.rag.ingest import IngestWorker, Outcome
from backend.rag.jobs import JobQueue
from backend.rag.sandbox import ParseLimits, SandboxParser
from backend.rag.storage import FileStorage
from backend.rag.store import KnowledgeStore

__all__ = ["IngestWorker", "Outcome", "Reconciler", "build_worker", "main"]

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 20.0
_PRUNE_IDLE_S = 3600.0
_CANCEL_WAIT_S = 5.0


class Reconciler:
    """Re-enqueues documents the queue lost: queued for `queued_for_s` seconds, or processing
    under a lease that ran out `processing_grace_s` seconds ago, and with no entry in the stream
    (a document whose entry is still there will be delivered or reclaimed anyway). This covers an
    enqueue that failed after the row was written, a Redis that lost data, and a job acknowledged
    by a consumer that then lost its work. Runs every `interval_s`; several reconcilers may run at
    once (a rare duplicate job is harmless: its claim finds nothing to do)."""

    def __init__(
        self,
        store: KnowledgeStore,
        jobs: JobQueue,
        *,
        interval_s: float,
        queued_for_s: float,
        processing_grace_s: float,
        prune_idle_s: float = _PRUNE_IDLE_S,
        metrics: RagMetrics | None = None,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._interval_s = interval_s
        self._queued_for_s = queued_for_s
        self._processing_grace_s = processing_grace_s
        self._prune_idle_ms = round(prune_idle_s * 1000)
        self._metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every `interval_s` until `stop` is set; errors are logged and retried."""
        while not stop.is_set():
            try:
                await self.reconcile()
            except Exception:
                logger.exception("reconciliation failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)

    async def reconcile(self) -> list[str]:
        """One pass; returns the ids re-enqueued. Also forgets consumers silent for an hour with
        nothing pending and updates the stream gauges of `metrics`. Raises RedisUnavailable,
        psycopg.Error."""
        stuck = await self._store.stuck(
            queued_for_s=self._queued_for_s, processing_grace_s=self._processing_grace_s
        )
        present = await self._jobs.document_ids() if stuck else set()
        requeued = [document_id for document_id in stuck if document_id not in present]
        for document_id in requeued:
            await self._jobs.enqueue(document_id)
        if requeued:
            logger.warning("re-enqueued %d stuck documents", len(requeued))
        await self._jobs.prune_consumers(idle_ms=self._prune_idle_ms)
        if self._metrics:
            self._metrics.stream_pending.set(await self._jobs.pending())
            self._metrics.stream_lag.set(await self._jobs.lag())
        return requeued


def guard_for(settings: Settings) -> LexiconStore:
    """The guard's lexicon store as `settings.guard` describe it, built as the chat UI builds its
    own (jieba's cache in the state directory). It reloads only while its `watch` runs (the
    long-running consumers start it), so `current()` never blocks the event loop. Loads the
    lexicon: blocking, call it from a thread. Raises LexiconError, OSError."""
    jieba_dir = settings.state_dir / "jieba"
    jieba_dir.mkdir(parents=True, exist_ok=True)
    return LexiconStore(
        settings.guard.lexicon_dir or builtin_lexicon_dir(),
        segmenter=jieba_segmenter(cache_dir=jieba_dir),
        check_interval_s=math.inf,
    )


def lease_for(settings: Settings) -> float:
    """The document lease: half the reclaim idle time, so a dead consumer's lease has run out
    before its job is reclaimed."""
    return settings.rag.claim_idle_s / 2


async def build_worker(
    settings: Settings,
    *,
    pool: AsyncConnectionPool,
    redis: aioredis.Redis,
    consumer: str,
    embedder: Embedder | None = None,
    guard: LexiconStore | None = None,
    metrics: RagMetrics | None = None,
    lane: asyncio.Lock | None = None,
) -> IngestWorker:
    """A consumer wired from `settings`. Loads the embedder when none is given (seconds; share
    one between the consumers of a process) and checks the store was set up for it; builds the
    guard's lexicon store from `settings.guard` when none is given (as the chat UI does), which
    chunks are checked against. Consumers of one process share one `lane` (`cpu_lane`). Raises
    EmbeddingMismatch, ModelError, ModelDownloadError,
    DatabaseUnavailable, RedisUnavailable, LexiconError."""
    rag = settings.rag
    if embedder is None:
        embedder = await asyncio.to_thread(
            load_embedder, rag, engine=settings.engine, cache_dir=settings.state_dir / "models"
        )
    store = KnowledgeStore(pool)
    await store.ensure_embedding(model=embedder.model_name, dim=embedder.dim)
    jobs = JobQueue(redis)
    await jobs.ensure_group()
    jieba_dir = settings.state_dir / "jieba"
    await asyncio.to_thread(jieba_dir.mkdir, parents=True, exist_ok=True)
    if guard is None:
        guard = await asyncio.to_thread(guard_for, settings)
    return IngestWorker(
        store,
        jobs,
        FileStorage(settings.rag_storage_dir),
        SandboxParser(ParseLimits.from_settings(rag)),
        Chunker(
            embedder.count_tokens,
            chunk_tokens=rag.chunk_tokens,
            overlap_tokens=rag.chunk_overlap_tokens,
        ),
        embedder,
        FullText(jieba_segmenter(cache_dir=jieba_dir)),
        consumer=consumer,
        lease_s=lease_for(settings),
        reclaim_idle_s=rag.claim_idle_s,
        max_deliveries=rag.max_deliveries,
        embed_batch=rag.embedding_batch,
        guard=guard.current,
        metrics=metrics,
        lane=lane,
    )


def reconciler_for(
    settings: Settings, store: KnowledgeStore, jobs: JobQueue, *, metrics: RagMetrics | None = None
) -> Reconciler:
    """The reconciler `settings` describe: every `reconcile_interval_s`; a document counts as
    stuck after twice the reclaim idle time (at least a minute) queued, or the reclaim idle time
    past its lease."""
    rag = settings.rag
    return Reconciler(
        store,
        jobs,
        interval_s=rag.reconcile_interval_s,
        queued_for_s=max(60.0, 2 * rag.claim_idle_s),
        processing_grace_s=rag.claim_idle_s,
        metrics=metrics,
    )


async def serve(settings: Settings, *, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Run the consumers and the reconciler until SIGTERM/SIGINT (see the module docstring).
    Raises ConfigError without database or Redis URLs, ServiceError, ModelError,
    EmbeddingMismatch."""
    if settings.database.url is None or settings.redis.url is None:
        raise ConfigError(
            "the RAG worker needs QWEN_DATABASE__URL and QWEN_REDIS__URL (`qwen-stack up` sets both)"
        )
    stop, abandon = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (abandon if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    database_url = settings.database.url.get_secret_value()
    await migrate(database_url)
    pool = await open_pool(database_url)
    redis = aioredis.from_url(
        settings.redis.url.get_secret_value(),
        decode_responses=True,
        socket_connect_timeout=3,
        socket_timeout=10,  # above the 1 s XREADGROUP block
    )
    watching: asyncio.Task[None] | None = None
    try:
        embedder = await asyncio.to_thread(
            load_embedder,
            settings.rag,
            engine=settings.engine,
            cache_dir=settings.state_dir / "models",
        )
        guard = await asyncio.to_thread(guard_for, settings)  # one lexicon for all consumers
        watching = asyncio.create_task(guard.watch(settings.guard.reload_interval_s))  # reloads
        host = f"{socket.gethostname()}-{os.getpid()}"
        lane = cpu_lane()
        workers = [
            await build_worker(
                settings,
                pool=pool,
                redis=redis,
                consumer=f"{host}-{n}",
                embedder=embedder,
                guard=guard,
                lane=lane,
            )
            for n in range(settings.rag.consumers)
        ]
        for worker in workers:
            await worker.warm_up()
        reconciler = reconciler_for(settings, KnowledgeStore(pool), JobQueue(redis))
        tasks = [asyncio.create_task(worker.run(stop)) for worker in workers]
        tasks.append(asyncio.create_task(reconciler.run(stop)))
        logger.info("RAG worker running %d consumers", len(workers))
        await stop.wait()
        logger.info("stopping: finishing jobs in progress (up to %gs)", grace_s)
        finishing: list[asyncio.Future[Any]] = [
            asyncio.gather(*tasks, return_exceptions=True),
            asyncio.ensure_future(abandon.wait()),
        ]
        await asyncio.wait(finishing, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if not task.done():
                logger.warning("abandoning a job in progress; it will be reclaimed")
                task.cancel()
        for future in finishing:
            future.cancel()
        # Bounded: a task whose cancellation was swallowed still ends by itself, `stop` being set.
        await asyncio.wait([*tasks, *finishing], timeout=_CANCEL_WAIT_S)
    finally:
        if watching is not None:
            watching.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await redis.aclose()
        await pool.close()


def main() -> int:
    """`python -m backend.rag.worker`: the process entrypoint (reads Settings from the
    environment). Returns the exit status."""
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings))
    except QwenStackError as exc:
        logger.error("RAG worker cannot run: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
