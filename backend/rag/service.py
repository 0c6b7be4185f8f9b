"""What one RAG worker process runs: the store, the upload path, retrieval and the ingestion
consumers, built at start-up from Settings and closed at shutdown.

An upload is made durable in this order, so nothing is lost whatever crashes when: the file is
streamed to content-addressed storage (size-capped, type sniffed from its bytes), the `documents` row
is written (unique per knowledge base + content hash: a re-upload is reported as a duplicate), and
only then is the job appended to the Redis stream. A row whose job never reached the stream is
re-queued by the reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import BinaryIO

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from backend.auth import Principal
from backend.config import Settings
from backend.db import migrate, open_pool
from backend.errors import ConfigError, DocumentNotFound, DocumentRejected, RejectReason
from backend.metrics import RagMetrics
from backend.rag.document import Hit
from backend.rag.embedding import Embedder, load_embedder
from backend.rag.fulltext import FullText
from backend.rag.indexer import cpu_lane
from backend.rag.jobs import JobQueue
from backend.rag.parsing import detect_format
from backend.rag.records import DocumentRecord, KnowledgeBase
from backend.rag.retrieval import Retriever
from backend.rag.storage import FileStorage, safe_display_name
from backend.rag.store import KnowledgeStore
from backend.rag.worker import IngestWorker, build_worker, guard_for, reconciler_for

logger = logging.getLogger(__name__)


@dataclass
class RagService:
    settings: Settings
    pool: AsyncConnectionPool
    redis: aioredis.Redis
    store: KnowledgeStore
    storage: FileStorage
    jobs: JobQueue
    embedder: Embedder
    retriever: Retriever
    metrics: RagMetrics
    workers: list[IngestWorker] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _watching: asyncio.Task[None] | None = None  # the lexicon's reloads (LexiconStore.watch)

    @classmethod
    async def start(cls, settings: Settings, *, consume: bool = True) -> RagService:
        """Connect, migrate, load the embedder and start the consumers. Raises ServiceError,
        ModelDownloadError, EmbeddingMismatch."""
        if settings.database.url is None or settings.redis.url is None:
            raise ConfigError(
                "the RAG worker needs QWEN_DATABASE__URL and QWEN_REDIS__URL (`qwen-stack up` sets both)"
            )
        database_url = settings.database.url.get_secret_value()
        await migrate(database_url)
        pool = await open_pool(database_url)
        redis = aioredis.from_url(
            settings.redis.url.get_secret_value(), decode_responses=True,
            socket_connect_timeout=3, socket_timeout=10,  # above the 1 s XREADGROUP block
        )  # fmt: skip
        try:
            embedder = await asyncio.to_thread(
                load_embedder, settings.rag, engine=settings.engine,
                cache_dir=settings.state_dir / "models",
            )  # fmt: skip
            store = KnowledgeStore(pool)
            await store.ensure_embedding(model=embedder.model_name, dim=embedder.dim)
            jobs = JobQueue(redis)
            await jobs.ensure_group()
            fulltext = FullText.create(cache_dir=settings.state_dir / "jieba")
            rag = settings.rag
            service = cls(
                settings=settings, pool=pool, redis=redis, store=store,
                storage=FileStorage(settings.rag_storage_dir), jobs=jobs, embedder=embedder,
                retriever=Retriever(
                    store, embedder, fulltext, candidates=rag.candidates, rrf_k=rag.rrf_k,
                    ef_search=rag.ef_search,
                ),
                metrics=RagMetrics(),
            )  # fmt: skip
        except BaseException:
            await pool.close()
            await redis.aclose()
            raise
        if consume:
            await service._start_consumers()
        return service

    async def _start_consumers(self) -> None:
        host = f"{socket.gethostname()}-{os.getpid()}"
        guard = guard_for(self.settings)  # one lexicon (and its reloads) for every consumer
        self._watching = asyncio.create_task(guard.watch(self.settings.guard.reload_interval_s))
        lane = cpu_lane()
        for n in range(self.settings.rag.consumers):
            worker = await build_worker(
                self.settings, pool=self.pool, redis=self.redis, consumer=f"{host}-{n}",
                embedder=self.embedder, metrics=self.metrics, guard=guard, lane=lane,
            )  # fmt: skip
            await worker.warm_up()
            self.workers.append(worker)
            self._tasks.append(asyncio.create_task(worker.run(self._stop)))
        reconciler = reconciler_for(self.settings, self.store, self.jobs, metrics=self.metrics)
        self._tasks.append(asyncio.create_task(reconciler.run(self._stop)))

    async def aclose(self) -> None:
        self._stop.set()
        if self._watching is not None:
            self._watching.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=30)
        await self.redis.aclose()
        await self.pool.close()

    async def checks(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await self.redis.ping()
            checks["redis"] = "ok"
        except Exception:
            checks["redis"] = "down"
        try:
            async with self.pool.connection() as conn:
                await conn.execute("SELECT 1")
            checks["database"] = "ok"
        except Exception:
            checks["database"] = "down"
        return checks

    async def add_upload(
        self, kb: KnowledgeBase, source: BinaryIO, *, filename: str, principal: Principal
    ) -> tuple[DocumentRecord, bool]:
        """Store one uploaded file and queue it. Returns (document, created); created is False for
        a file whose content this knowledge base already holds. Raises DocumentRejected."""
        max_bytes = int(self.settings.rag.max_file_mb * 1024 * 1024)
        stored = await asyncio.to_thread(self.storage.save, source, max_bytes=max_bytes)
        try:
            path = self.storage.path(stored.key)
            fmt = detect_format(await asyncio.to_thread(path.read_bytes))  # size-capped above
        except DocumentRejected as exc:
            self.metrics.uploads.labels(outcome=str(exc.reason)).inc()
            if not await self.store.storage_key_in_use(stored.key):
                await asyncio.to_thread(self.storage.delete, stored.key)
            raise
        record, created = await self.store.add_document(
            kb, filename=safe_display_name(filename), content_hash=stored.sha256,
            size_bytes=stored.size, format=fmt, storage_key=stored.key,
            uploaded_by=principal.user,
        )  # fmt: skip
        if created:
            await self.jobs.enqueue(record.id)
            self.metrics.uploads.labels(outcome="queued").inc()
        else:
            self.metrics.uploads.labels(outcome=str(RejectReason.DUPLICATE)).inc()
        return record, created

    async def document_in(
        self, kb: str, document_id: str, *, principal: Principal
    ) -> DocumentRecord:
        record = await self.store.get_document(document_id, principal=principal)
        if record.kb != kb:
            raise DocumentNotFound(f"document {document_id} is not in {kb}")
        return record

    async def delete_document(self, kb: str, document_id: str, *, principal: Principal) -> None:
        record = await self.document_in(kb, document_id, principal=principal)
        await self.store.delete_document(record.id, principal=principal)
        if not await self.store.storage_key_in_use(record.storage_key):
            await asyncio.to_thread(self.storage.delete, record.storage_key)

    async def delete_kb(self, kb: str, *, principal: Principal) -> None:
        keys = await self.store.delete_kb(kb, principal=principal)
        for key in keys:
            if not await self.store.storage_key_in_use(key):
                await asyncio.to_thread(self.storage.delete, key)

    async def reindex(self, kb: str, document_id: str, *, principal: Principal) -> DocumentRecord:
        await self.document_in(kb, document_id, principal=principal)
        record = await self.store.requeue(document_id, principal=principal)
        await self.jobs.enqueue(record.id)
        return record

    async def retrieve(
        self, query: str, *, principal: Principal, kbs: list[str] | None, top_k: int
    ) -> list[Hit]:
        with self.metrics.retrieve_seconds.time():
            return await self.retriever.retrieve(query, principal=principal, kbs=kbs, top_k=top_k)
