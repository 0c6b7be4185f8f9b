"""The ingestion consumer: one job at a time from the stream into the store.

`IngestWorker` takes a job (`JobQueue.next`), claims the document in the store (a lease), runs the
`Indexer` (backend/rag/indexer.py) on the stored file (parse in the sandbox, chunk, embed in
batches, segment for full-text search, check each chunk with the guard) and writes the result with `finish` in one transaction;
only then is the job acknowledged. A document whose chunks hit the guard's lexicon is indexed all
the same, flagged with the categories hit and the number of chunks that hit (the admin list shows
them): retrieval withholds blocked chunks at question time. While it works, a heartbeat renews
the lease and touches the stream entry every `lease_s / 3`. So:

- a crashed consumer's job is reclaimed after `reclaim_idle_s` of silence, by which time its lease
  (`lease_s` < `reclaim_idle_s`) has run out, so the new consumer's claim succeeds;
- a file the parser refuses (DocumentRejected) fails the document at once, no retry;
- any other error leaves the job un-acknowledged: it is redelivered after `reclaim_idle_s`, and a
  job delivered more than `max_deliveries` times fails its document (`dead_letter`) and goes to
  the dead-letter stream (a poison file ends `failed`, it never blocks the queue);
- a failure of Redis or PostgreSQL themselves is not the document's: that delivery is not
  counted (`JobQueue.forgive`) and the consumer backs off, so an outage fails no document;
- a consumer that lost its lease (it stalled, the document was requeued) discards its work;
- a duplicate job (the document is indexed, failed, deleted or leased by a live consumer) is
  acknowledged without work.

CPU-bound steps run in threads, so the event loop keeps heartbeating meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

import psycopg

from backend.errors import ConfigError, DocumentRejected, ServiceError
from backend.metrics import RagMetrics
from backend.rag.chunking import Chunker
from backend.rag.embedding import Embedder
from backend.rag.indexer import (
    IndexedDocument,
    Indexer,
    MatcherProvider,
    Parser,
    Segmenter,
)
from backend.rag.jobs import Job, JobQueue
from backend.rag.records import Claim
from backend.rag.storage import FileStorage
from backend.rag.store import KnowledgeStore

logger = logging.getLogger(__name__)

DEAD_LETTER_CODE = "dead_letter"
DEAD_LETTER_MESSAGE = "多次处理失败，已停止重试，请检查文件后重新上传。"
_BLOCK_MS = 1000  # how long `next` waits for a job; also how fast `run` notices `stop`
_BACKOFF_S = (1.0, 30.0)  # pause after a service failure: first, and the cap as it doubles
# Failures of the services rather than of the document: they do not count towards dead letters.
_OUTAGES = (ServiceError, psycopg.OperationalError)


class Outcome(enum.StrEnum):
    """How `IngestWorker.process` left a job."""

    INDEXED = "indexed"  # chunks written, job acknowledged
    REJECTED = "rejected"  # the file was refused: document failed, job acknowledged
    SKIPPED = "skipped"  # nothing to do (finished, deleted, leased elsewhere): acknowledged
    FENCED = "fenced"  # the lease was lost while working: work discarded, acknowledged
    RETRY = "retry"  # an error: left un-acknowledged for redelivery
    UNAVAILABLE = "unavailable"  # a service was down: redelivered later, this delivery uncounted
    DEAD_LETTERED = "dead_lettered"  # too many deliveries: document failed, job dead-lettered


class _LeaseLost(Exception):
    """The claim was fenced off while working (raised to abort the indexing)."""


class IngestWorker:
    """One consumer of the ingestion stream, named `consumer` (unique among live consumers).

    `lease_s`: the document lease, renewed every `lease_s / 3` while working; it must be shorter
    than `reclaim_idle_s`, the silence after which another consumer takes a job over.
    `max_deliveries`: deliveries before a job is dead-lettered. `embed_batch`: the embedder's
    batch size and `guard` the lexicon chunks are checked against (see Indexer). `metrics` counts
    outcomes, chunks and dead letters; `lane` is the process's CPU lane (`cpu_lane`). Several
    workers may share the store, the queue, the storage, the models, the guard and the lane.
    """

    def __init__(
        self,
        store: KnowledgeStore,
        jobs: JobQueue,
        storage: FileStorage,
        parser: Parser,
        chunker: Chunker,
        embedder: Embedder,
        fulltext: Segmenter,
        *,
        consumer: str,
        lease_s: float,
        reclaim_idle_s: float,
        max_deliveries: int,
        embed_batch: int,
        guard: MatcherProvider | None = None,
        metrics: RagMetrics | None = None,
        lane: asyncio.Lock | None = None,
    ) -> None:
        if not 0 < lease_s < reclaim_idle_s:
            raise ConfigError("the lease must be shorter than the reclaim idle time")
        self._store = store
        self._jobs = jobs
        self._storage = storage
        self._parser = parser
        self._indexer = Indexer(
            parser, chunker, embedder, fulltext, embed_batch=embed_batch, guard=guard,
            metrics=metrics, lane=lane,
        )  # fmt: skip
        self.consumer = consumer
        self._lease_s = lease_s
        self._reclaim_idle_ms = round(reclaim_idle_s * 1000)
        self._max_deliveries = max_deliveries
        self._metrics = metrics

    async def warm_up(self) -> None:
        """See `Indexer.warm_up`; a failure is logged, never raised (the first document pays)."""
        try:
            await self._indexer.warm_up()
        except Exception:
            logger.exception("consumer %s: warm-up failed", self.consumer)

    async def run(self, stop: asyncio.Event) -> None:
        """Take and process jobs until `stop` is set; the job in progress then finishes first.
        Backs off (1 s doubling to 30 s) while Redis or PostgreSQL fail. Cancelling abandons the
        job in progress un-acknowledged (it will be reclaimed)."""
        logger.info("consumer %s started", self.consumer)
        try:
            backoff_s = 0.0
            while not stop.is_set():
                if backoff_s:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff_s)
                try:
                    job = await self._jobs.next(
                        self.consumer, block_ms=_BLOCK_MS, reclaim_idle_ms=self._reclaim_idle_ms
                    )
                    outcome = await self.process(job) if job is not None else None
                except Exception:
                    logger.exception("consumer %s: cannot read the job queue", self.consumer)
                    outcome = Outcome.UNAVAILABLE
                if outcome is Outcome.UNAVAILABLE:
                    backoff_s = min(max(2 * backoff_s, _BACKOFF_S[0]), _BACKOFF_S[1])
                else:
                    backoff_s = 0.0
        finally:
            self._parser.close()
        logger.info("consumer %s stopped", self.consumer)

    async def process(self, job: Job) -> Outcome:
        """Handle one delivery of `job` (see the module docstring). Never raises, except
        CancelledError."""
        try:
            outcome = await self._process(job)
            logger.info("document %s: %s (delivery %d)", job.document_id, outcome, job.deliveries)
        except asyncio.CancelledError:
            raise
        except _OUTAGES:
            logger.exception("document %s: a service failed; will retry", job.document_id)
            with contextlib.suppress(Exception):
                await self._jobs.forgive(job, self.consumer)
            outcome = Outcome.UNAVAILABLE
        except Exception:
            logger.exception(
                "document %s: will retry (delivery %d)", job.document_id, job.deliveries
            )
            outcome = Outcome.RETRY
        if self._metrics:
            self._metrics.documents.labels(outcome=str(outcome)).inc()
        return outcome

    async def _process(self, job: Job) -> Outcome:
        if job.deliveries > self._max_deliveries:
            await self._store.fail(
                job.document_id, code=DEAD_LETTER_CODE, message=DEAD_LETTER_MESSAGE
            )
            await self._jobs.dead_letter(job, reason=f"failed {job.deliveries - 1} deliveries")
            if self._metrics:
                self._metrics.dead_letters.inc()
            return Outcome.DEAD_LETTERED
        claim = await self._store.claim(job.document_id, lease_s=self._lease_s)
        if claim is None:
            await self._jobs.ack(job)
            return Outcome.SKIPPED
        try:
            indexed = await self._with_heartbeat(job, claim)
        except _LeaseLost:
            await self._jobs.ack(job)
            return Outcome.FENCED
        except DocumentRejected as exc:
            await self._store.fail(claim, code=exc.reason, message=exc.user_message)
            await self._jobs.ack(job)
            logger.info("document %s rejected: %s", job.document_id, exc)
            return Outcome.REJECTED
        writing_from = time.perf_counter()
        finished = await self._store.finish(
            claim, indexed.chunks, indexed.embeddings, search_texts=indexed.search_texts,
            guard_categories=indexed.guard_categories,
            guard_flagged_chunks=indexed.guard_flagged_chunks,
        )  # fmt: skip
        if self._metrics:
            self._metrics.stage_seconds.labels(stage="write").observe(
                time.perf_counter() - writing_from
            )
        await self._jobs.ack(job)
        if finished and self._metrics:
            self._metrics.chunks.inc(len(indexed.chunks))
        if finished and indexed.guard_flagged_chunks:
            logger.info(
                "document %s flagged: %d of %d chunks hit %s",
                job.document_id,
                indexed.guard_flagged_chunks,
                len(indexed.chunks),
                ",".join(indexed.guard_categories),
            )
        return Outcome.INDEXED if finished else Outcome.FENCED

    async def _with_heartbeat(self, job: Job, claim: Claim) -> IndexedDocument:
        """Index the claimed document while a heartbeat keeps the lease and the entry alive.
        Raises _LeaseLost when the lease is lost, else whatever indexing raises.

        The heartbeat is stopped by an event, never cancelled: on Python 3.11 a cancellation that
        meets a finishing Redis or database call can be swallowed (asyncio.wait_for inside the
        clients), which would leave a cancelled heartbeat running and this method waiting."""

        async def progress(fraction: float) -> None:
            if not await self._store.set_progress(claim, fraction):
                raise _LeaseLost

        path = self._storage.path(claim.document.storage_key)
        done = asyncio.Event()
        work = asyncio.create_task(self._indexer.index(path, on_progress=progress))
        beat = asyncio.create_task(self._heartbeat(job, claim, done))
        try:
            await asyncio.wait({work, beat}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the heartbeat ends early only when the lease is lost
                raise _LeaseLost
            return work.result()
        finally:
            done.set()
            work.cancel()
            for task in (work, beat):
                task.add_done_callback(_retrieve)
            # Bounded: a task that swallowed its cancellation finishes on its own later.
            await asyncio.wait({work, beat}, timeout=self._lease_s)

    async def _heartbeat(self, job: Job, claim: Claim, done: asyncio.Event) -> None:
        """Renew the lease and touch the entry every lease_s / 3 until `done` is set; returns
        early when the lease is lost. A failed beat (database blip) is retried on the next."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self._lease_s / 3)
            if done.is_set():
                return
            try:
                if not await self._store.renew(claim, lease_s=self._lease_s):
                    logger.warning("document %s: lease lost", claim.document.id)
                    return
                if not await self._jobs.touch(job, self.consumer):
                    logger.warning("job %s was taken over by another consumer", job.entry_id)
            except Exception:
                logger.exception("document %s: heartbeat failed", claim.document.id)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background task's outcome as seen (no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()
