"""The indexing of one stored file: parse (sandbox), chunk, embed, segment, guard-check.

`Indexer` does the work without touching the store or the queue; `IngestWorker`
(backend/rag/ingest.py) claims documents, runs it and writes its result. Its Python-heavy steps
take turns on the process's CPU lane (`cpu_lane`), shared by every consumer of the process.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from backend.errors import DocumentRejected, RejectReason
from backend.guard import Matcher
from backend.metrics import RagMetrics
from backend.rag.chunking import Chunker
from backend.rag.document import Chunk, ParsedDocument
from backend.rag.embedding import Embedder, Vectors

logger = logging.getLogger(__name__)

PARSED_PROGRESS = 0.1  # progress once the file is parsed and chunked; embedding fills the rest
EMBEDDED_PROGRESS = 0.95  # progress once every batch is embedded; the store's finish sets 1
EMBED_GROUP_BATCHES = 4  # embedding batches per embedder call (progress is reported per call)

Progress = Callable[[float], Awaitable[None]]
# The lexicon in force, asked for once per document (LexiconStore.current).
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
