"""Every Prometheus metric of qwen-stack, in one place.

One `Metrics` per process, built at start-up on its own registry (no global state), exposed at
`/metrics`. Labels are small fixed sets (outcome, tier, replica from configuration) -- never a user
or session id. Latency buckets are sized for LLM answers (tens of ms to a minute).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NAMESPACE = "qwen"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


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

    def count_sanitized(self, removed: Iterable[tuple[str, int]]) -> None:
        """Add one answer's Markdown rewrites: (kind, count) pairs (`MarkdownFilter.removed`)."""
        for kind, count in removed:
            self.answer_sanitized.labels(kind).inc(count)

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
