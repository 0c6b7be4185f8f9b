"""The ingestion consumer: one job at a time from the stream into the store.

`IngestWorker` takes a job (`JobQueue.next`), claims the document in the store (a lease), runs the
`Indexer` on the stored file (parse in the sandbox, chunk, embed in batches, segment for full-text
search, check each chunk with the guard) and writes the result with `finish` in one transaction;
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
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psycopg

from backend.errors import ConfigError, DocumentRejected, RejectReason, ServiceError
from backend.guard import Matcher
from backend.metrics import RagMetrics
from backend.rag.chunking import Chunker
from backend.rag.document import Chunk, ParsedDocument
from backend.rag.embedding import Embedder, Vectors
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

PARSED_PROGRESS = 0.1  # progress once the file is parsed and chunked; embedding fills the rest
EMBEDDED_PROGRESS = 0.95  # progress once every batch is embedded; the store's finish sets 1
EMBED_GROUP_BATCHES = 4  # embedding batches per embedder call (progress is reported per call)

Progress = Callable[[float], Awaitable[None]]
# The lexicon in force, asked for once per document (LexiconStore.current: it may reload).
MatcherProvider = Callable[[], Matcher]


class Parser(Protocol):
    """Extracts a file's text (SandboxParser). Raises DocumentRejected for a bad file."""

    async def parse(self, path: Path) -> ParsedDocument: ...

    def close(self) -> None:
        """Release its processes (the consumer calls it when it stops)."""
        ...


class Segmenter(Protocol):
    """Turns text into the space-joined tokens the full-text index reads (FullText)."""

    def index_text(self, text: str) -> str: ...


@dataclass(frozen=True)
class IndexedDocument:
    """What `KnowledgeStore.finish` writes: row i of `embeddings` and `search_texts[i]` belong to
    `chunks[i]`; `guard_categories` (sorted) are the lexicon categories the chunks hit and
    `guard_flagged_chunks` how many chunks hit any (both empty without a guard)."""

    chunks: tuple[Chunk, ...]
    embeddings: Vectors
    search_texts: tuple[str, ...]
    guard_categories: tuple[str, ...] = ()
    guard_flagged_chunks: int = 0


@dataclass(frozen=True)
class _Prepared:
    """The work done beside the embedder: search texts and the guard's findings."""

    search_texts: list[str]
    guard_categories: tuple[str, ...]
    guard_flagged_chunks: int


def cpu_lane() -> asyncio.Lock:
    """The lane the Python-heavy ingestion steps of one process take turns on: chunking, each
    embedder call, segmenting and guard checks, whichever consumer they belong to.

    They must not run side by side. A forward pass of the model releases the GIL inside each
    torch operator but takes it back between operators; with another thread busy in Python, each
    of those hand-overs waits out the interpreter's switch interval, and the embedding runs ~4x
    slower (measured here: 128 MiniLM texts in 2.9 s alone, 13 s beside one spinning thread), far
    more than the other step gains. The parser runs in a child process and the database write in
    PostgreSQL, so those still overlap another consumer's embedding."""
    return asyncio.Lock()


class Indexer:
    """Parses, chunks, embeds, segments and guard-checks one file. Holds no per-document state, so
    one instance may serve several concurrent consumers (the embedder, segmenter and matchers are
    thread-safe)."""

    def __init__(
        self,
        parser: Parser,
        chunker: Chunker,
        embedder: Embedder,
        fulltext: Segmenter,
        *,
        embed_batch: int,
        guard: MatcherProvider | None = None,
        metrics: RagMetrics | None = None,
        lane: asyncio.Lock | None = None,
    ) -> None:
        """`guard`: the lexicon each chunk's text is checked against (None: no check).
        `metrics`: each stage's seconds per document go to `rag_ingest_stage_seconds`.
        `lane`: the process's CPU lane (see `cpu_lane`), shared by its consumers; None: a lane of
        this indexer's own."""
        if embed_batch < 1:
            raise ValueError("embed_batch must be at least 1")
        self._metrics = metrics
        self._parser = parser
        self._chunker = chunker
        self._embedder = embedder
        self._fulltext = fulltext
        self._guard = guard
        self._batch = embed_batch
        self._lane = lane if lane is not None else cpu_lane()

    async def index(self, path: Path, *, on_progress: Progress) -> IndexedDocument:
        """The chunks, embeddings, search texts and guard findings of the file at `path`.

        Awaits `on_progress(fraction)` after parsing and after each embedder call of
        EMBED_GROUP_BATCHES × `embed_batch` texts (fractions grow from PARSED_PROGRESS to
        EMBEDDED_PROGRESS); an exception it raises aborts the work.
        Raises DocumentRejected when the file is refused (including NO_TEXT when it yields no
        chunk), OSError when it cannot be read (e.g. missing from storage), and whatever the
        embedder raises (EmbeddingMismatch, ...).
        """
        started = time.perf_counter()
        document = await self._parser.parse(path)
        parsed = time.perf_counter()
        async with self._lane:
            chunks = await asyncio.to_thread(self._chunker.split, document)
        self._observe(parse=parsed - started, chunk=time.perf_counter() - parsed)
        if not chunks:
            raise DocumentRejected(RejectReason.NO_TEXT, "no chunk")
        await on_progress(PARSED_PROGRESS)
        texts = [self._chunker.embedding_text(chunk) for chunk in chunks]
        parts: list[Vectors] = []
        # Several batches per call: the embedder sorts a call's texts by length, so batches pad
        # less than one call per batch would (~20% faster on MiniLM here).
        group = self._batch * EMBED_GROUP_BATCHES
        embedding_from = time.perf_counter()
        for start in range(0, len(texts), group):
            async with self._lane:
                parts.append(
                    await asyncio.to_thread(self._embedder.embed, texts[start : start + group])
                )
            done = min(start + group, len(texts)) / len(texts)
            await on_progress(PARSED_PROGRESS + (EMBEDDED_PROGRESS - PARSED_PROGRESS) * done)
        segmenting_from = time.perf_counter()
        async with self._lane:
            prepared = await asyncio.to_thread(self._prepare, texts, chunks)
        self._observe(
            embed=segmenting_from - embedding_from, segment=time.perf_counter() - segmenting_from
        )
        embeddings: Vectors = np.concatenate(parts, axis=0)
        logger.debug("indexed %s: %d chunks", path.name, len(chunks))
        return IndexedDocument(
            chunks=tuple(chunks), embeddings=embeddings,
            search_texts=tuple(prepared.search_texts),
            guard_categories=prepared.guard_categories,
            guard_flagged_chunks=prepared.guard_flagged_chunks,
        )  # fmt: skip

    async def warm_up(self) -> None:
        """Pay the one-time costs before the first document: a parser zygote started with its
        parsers imported, jieba's dictionary loaded, the guard's automaton and character tables
        built (~1-2 s in all)."""
        with tempfile.TemporaryDirectory(prefix="qwen-warm-up-") as scratch:
            sample = Path(scratch) / "warm-up.txt"
            sample.write_text("预热：解析、分词与检查。Warm-up.\n", encoding="utf-8")
            document = await self._parser.parse(sample)
        async with self._lane:
            chunks = await asyncio.to_thread(self._chunker.split, document)
            texts = [self._chunker.embedding_text(chunk) for chunk in chunks]
            await asyncio.to_thread(self._prepare, texts, chunks)

    def _prepare(self, texts: list[str], chunks: list[Chunk]) -> _Prepared:
        """Search texts of `texts`, and the guard's check of each chunk's text (what retrieval
        hands out and screens again at question time). Runs in a thread."""
        search_texts = [self._fulltext.index_text(text) for text in texts]
        categories: set[str] = set()
        flagged = 0
        if self._guard is not None:
            matcher = self._guard()
            for chunk in chunks:
                hits = matcher.check(chunk.text).hits
                categories.update(hit.category for hit in hits)
                flagged += bool(hits)
        return _Prepared(search_texts, tuple(sorted(categories)), flagged)

    def _observe(self, **seconds: float) -> None:
        if self._metrics is not None:
            for stage, value in seconds.items():
                self._metrics.stage_seconds.labels(stage=stage).observe(value)


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
