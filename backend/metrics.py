"""Every Prometheus metric of qwen-stack, in one place.

One `Metrics` per process, built at start-up on its own registry (no global state), exposed at
`/metrics`. Labels are small fixed sets (outcome, tier, replica in the engine pool, guard stage,
lexicon category, capped) -- never a user or session id. Latency buckets are sized for LLM answers
(tens of ms to a minute).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NAMESPACE = "qwen"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
# Lexicon categories come from the admin's files: past this many, further ones count as "other".
GUARD_CATEGORY_LIMIT = 32
OTHER_CATEGORY = "other"


class GuardStage(enum.StrEnum):
    """Where the pipeline checks text with the guard (the audit record's verdict stages)."""

    INPUT = "input"  # the user's message
    RETRIEVAL = "retrieval"  # each retrieved chunk
    OUTPUT = "output"  # the streamed answer (and the system-prompt canary)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "requests", "Chat requests by outcome.", ["outcome"], namespace=NAMESPACE, registry=r
        )
        self.tier = Counter(
            "degradation_tier", "Answers by degradation tier.", ["tier"], namespace=NAMESPACE,
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "time_to_first_token_seconds", "From the message to the first answer token.",
            namespace=NAMESPACE, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "answer_seconds", "From the message to the last answer token.",
            namespace=NAMESPACE, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "queue_wait_seconds", "Time spent waiting for a session slot.",
            namespace=NAMESPACE, buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "queue_depth", "Requests waiting for a session slot (last seen).",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.failovers = Counter(
            "engine_failovers", "Requests moved to another replica before the first token.",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.engine_up = Gauge(
            "engine_up", "1 when the replica answers its health probe.", ["replica"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.breaker_open = Gauge(
            "engine_breaker_open", "1 when the replica's circuit breaker is open.", ["replica"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "prompt_tokens", "Prompt tokens sent to the engines.", namespace=NAMESPACE,
            registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "completion_tokens", "Answer tokens the engines generated, stopped answers included.",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.slots_in_use = Gauge(
            "slots_in_use", "Live session leases per replica (the shared table in Redis, read "
            "at scrape: every chat_ui reports the same value).", ["replica"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.slots_capacity = Gauge(
            "slots_capacity", "Session slots per replica; 0 while this chat_ui finds it unhealthy.",
            ["replica"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.guard_hits = Counter(
            "guard_hits", "Guarded texts with a lexicon hit, by stage, category and severity "
            "(each category and severity once per text).", ["stage", "category", "severity"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.citations_removed = Counter(
            "citations_removed", "Citations [n] to no retrieved chunk, removed from answers.",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "rate_limited", "Requests refused by a per-user limit, by kind.", ["kind"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.audit_failures = Counter(
            "audit_write_failures", "Audit records that could not be written, by sink.",
            ["sink"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.answer_sanitized = Counter(
            "answer_sanitized", "Answer Markdown rewritten so it cannot fetch or run, by kind.",
            ["kind"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self._guard_categories: set[str] = set()  # labelled so far, up to GUARD_CATEGORY_LIMIT

    def count_sanitized(self, removed: Iterable[tuple[str, int]]) -> None:
        """Add one answer's Markdown rewrites: (kind, count) pairs (`MarkdownFilter.removed`)."""
        for kind, count in removed:
            self.answer_sanitized.labels(kind).inc(count)

    def set_engines(self, *, up: Mapping[str, bool], breaker_open: Mapping[str, bool]) -> None:
        """Set the replica gauges from the pool's state now: one series per replica in the pool,
        none left for a replica that has left it (discovered replicas come and go)."""
        self.engine_up.clear()
        for replica, is_up in up.items():
            self.engine_up.labels(replica).set(1 if is_up else 0)
        self.breaker_open.clear()
        for replica, is_open in breaker_open.items():
            self.breaker_open.labels(replica).set(1 if is_open else 0)

    def set_slots(self, in_use: Mapping[str, int] | None, *, capacity: Mapping[str, int]) -> None:
        """Set the slot gauges from one read of the slot table: `in_use` live leases per replica
        (None: the table could not be read, and the gauge is emptied rather than left stale),
        `capacity` the slots each replica offers now."""
        self.slots_in_use.clear()
        for replica, count in (in_use or {}).items():
            self.slots_in_use.labels(replica).set(count)
        self.slots_capacity.clear()
        for replica, slots in capacity.items():
            self.slots_capacity.labels(replica).set(slots)

    def expect_guard_hits(self, stage: GuardStage, pairs: Iterable[tuple[str, str]]) -> None:
        """Create the (category, severity) series of `stage` at zero, so that `rate()` sees the
        first hit of each (a counter that appears at 1 has no increase)."""
        for category, severity in sorted(set(pairs)):
            self.guard_hits.labels(stage.value, self._guard_category(category), severity)

    def count_guard_hits(self, stage: GuardStage, pairs: Iterable[tuple[str, str]]) -> None:
        """Count one checked text's hits, given as (category, severity): each pair once."""
        for category, severity in sorted(set(pairs)):
            self.guard_hits.labels(stage.value, self._guard_category(category), severity).inc()

    def _guard_category(self, category: str) -> str:
        if category not in self._guard_categories:
            if len(self._guard_categories) >= GUARD_CATEGORY_LIMIT:
                return OTHER_CATEGORY
            self._guard_categories.add(category)
        return category

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


INGEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
RETRIEVE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)


class RagMetrics:
    """The RAG worker's metrics (its own process and registry): uploads, ingestion, retrieval."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.uploads = Counter(
            "rag_uploads", "Uploaded files by outcome (queued, duplicate, or the reject reason).",
            ["outcome"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.documents = Counter(
            "rag_documents", "Documents finished by the ingestion consumers, by outcome.",
            ["outcome"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "rag_ingest_stage_seconds", "Time per document in each ingestion stage.", ["stage"],
            namespace=NAMESPACE, buckets=INGEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.chunks = Counter(
            "rag_chunks_indexed", "Chunks written to the store.", namespace=NAMESPACE, registry=r
        )
        self.dead_letters = Counter(
            "rag_dead_letters", "Jobs moved to the dead-letter stream.", namespace=NAMESPACE,
            registry=r,
        )  # fmt: skip
        self.stream_lag = Gauge(
            "rag_stream_lag", "Ingestion jobs not yet delivered to a consumer (last seen).",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.stream_pending = Gauge(
            "rag_stream_pending", "Ingestion jobs delivered but not acknowledged (last seen).",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.retrieve_seconds = Histogram(
            "rag_retrieve_seconds", "The whole retrieve call: embed, dense, full text, fusion.",
            namespace=NAMESPACE, buckets=RETRIEVE_BUCKETS, registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
