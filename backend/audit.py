"""The audit log: one append-only, hash-chained record per chat request, whatever its outcome.

    trail = AuditTrail(user=..., thread_id=..., request_id=..., started=time.monotonic())
    ...                                         # the pipeline fills the trail as it learns facts
    await audit_log.record(trail, prompt=text, error=exc_or_none)  # never raises
    result = await verify(pool)                 # `qwen-stack audit verify`

A record never holds the prompt, only its HMAC-SHA256 under `audit.hmac_key`. Each record's
`hash = sha256(prev_hash || canonical JSON of its fields)`, the first `prev_hash` being 64 zeros.

Concurrency: appends from any number of processes are serialized by `SELECT ... FOR UPDATE` on the
one row of `audit_chain_head`, in the same transaction that inserts the record and moves the head.
A row lock rather than `pg_advisory_xact_lock`: the lock and the state it guards (the newest id
and hash) are the same row, no lock-number namespace is shared with other code, and the head lets
`verify` notice when the newest records were deleted -- a chain alone cannot show its own tail was
cut. The database refuses UPDATE, DELETE and TRUNCATE on the log (0003_audit.sql); `verify`
catches what a superuser who disabled those triggers changed. The optional JSONL sink gets each
committed record as one line (fields, prev_hash and hash) for SIEM shipping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from backend.errors import (
    DatabaseUnavailable,
    EngineError,
    EngineTimeout,
    QueueFull,
    QueueTimeout,
    RateLimited,
)
from backend.metrics import Metrics

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
CLIENT_DISCONNECTED = "client_disconnected"  # `task.cancel(CLIENT_DISCONNECTED)`: not a user stop
WRITE_TIMEOUT_S = 5.0


class Outcome(enum.StrEnum):
    """How a chat request ended."""

    ANSWERED = "answered"  # a whole answer (possibly degraded: see the tier)
    BLOCKED_INPUT = "blocked_input"
    BLOCKED_OUTPUT = "blocked_output"
    REFUSED_BUSY = "refused_busy"  # degradation chose the busy tier
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    RATE_LIMITED = "rate_limited"
    ENGINE_ERROR = "engine_error"
    ENGINE_TIMEOUT = "engine_timeout"
    STOPPED = "stopped"  # the user stopped it (the consumer closed or cancelled the answer)
    DISCONNECTED = "disconnected"  # cancelled with CLIENT_DISCONNECTED
    ERROR = "error"


@dataclass(frozen=True)
class AuditRecord:
    """What is recorded about one request. Durations in milliseconds; chunk ids are pgvector
    `chunks.id`s; `verdicts` maps a guard stage (input, retrieval, output) to the categories hit."""

    user: str
    thread_id: str
    request_id: str
    prompt_hmac: str
    replica: str | None
    tier: str
    retrieved_chunk_ids: tuple[int, ...]
    cited_chunk_ids: tuple[int, ...]
    verdicts: Mapping[str, tuple[str, ...]]
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: int | None
    latency_ms: int
    outcome: Outcome


@dataclass(frozen=True)
class ChainedRecord:
    """A record as stored: its place in the chain and the hashes that bind it there."""

    id: int
    created_at: datetime
    record: AuditRecord
    prev_hash: str
    hash: str

    def fields(self) -> dict[str, Any]:
        """The hashed fields, as they go into the canonical JSON."""
        r = self.record
        return {
            "id": self.id, "created_at": self.created_at.astimezone(UTC).isoformat(),
            "user": r.user, "thread_id": r.thread_id, "request_id": r.request_id,
            "prompt_hmac": r.prompt_hmac, "replica": r.replica, "tier": r.tier,
            "retrieved_chunk_ids": list(r.retrieved_chunk_ids),
            "cited_chunk_ids": list(r.cited_chunk_ids),
            "verdicts": {stage: list(cats) for stage, cats in r.verdicts.items()},
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "ttft_ms": r.ttft_ms, "latency_ms": r.latency_ms, "outcome": r.outcome.value,
        }  # fmt: skip


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int  # records whose hash and link were confirmed
    first_bad_id: int | None = None
    reason: str = ""


def canonical_json(fields: Mapping[str, Any]) -> str:
    """Sorted keys, no spaces, UTF-8 as is: the same fields always give the same text."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """sha256(prev_hash || canonical JSON of `fields`), hex."""
    return hashlib.sha256((prev_hash + canonical_json(fields)).encode("utf-8")).hexdigest()


_ERROR_OUTCOMES: tuple[tuple[type[BaseException], Outcome], ...] = (
    (RateLimited, Outcome.RATE_LIMITED),
    (QueueFull, Outcome.QUEUE_FULL),
    (QueueTimeout, Outcome.QUEUE_TIMEOUT),
    (EngineTimeout, Outcome.ENGINE_TIMEOUT),  # before EngineError, its base
    (EngineError, Outcome.ENGINE_ERROR),
    (asyncio.CancelledError, Outcome.STOPPED),  # the UI's stop button cancels the answer's task
    (GeneratorExit, Outcome.STOPPED),  # the consumer closed the answer early
)


@dataclass
class AuditTrail:
    """The facts of one request, filled in by the pipeline as it learns them and sealed into an
    `AuditRecord` at the end. One per request, used from that request's task only. `started` and
    `first_token_at` are `time.monotonic()` readings; `outcome` is set where the pipeline decides
    one (blocked, refused), otherwise `conclude` derives it from how the request ended."""

    user: str
    thread_id: str
    request_id: str
    started: float
    replica: str | None = None
    tier: str = "normal"
    retrieved_chunk_ids: tuple[int, ...] = ()
    cited_chunk_ids: tuple[int, ...] = ()
    verdicts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # engine deltas seen (one token each on vLLM and llama.cpp)
    first_token_at: float | None = None
    outcome: Outcome | None = None
    finished: bool = False  # the pipeline yielded its final event

    def verdict(self, stage: str, categories: Iterable[str]) -> None:
        """Record a guard stage's verdict (an empty list: checked and clean)."""
        self.verdicts[stage] = tuple(sorted(set(categories)))

    def count_delta(self) -> None:
        self.completion_tokens += 1

    def conclude(self, error: BaseException | None) -> Outcome:
        """The outcome set by the pipeline, else `answered` once the answer finished, else what
        `error` says (None with an unfinished answer: `error`)."""
        if self.outcome is not None:
            return self.outcome
        if self.finished:
            return Outcome.ANSWERED
        if isinstance(error, asyncio.CancelledError) and error.args[:1] == (CLIENT_DISCONNECTED,):
            return Outcome.DISCONNECTED
        return next((o for kind, o in _ERROR_OUTCOMES if isinstance(error, kind)), Outcome.ERROR)

    def seal(self, *, prompt_hmac: str, ended: float, error: BaseException | None) -> AuditRecord:
        first = self.first_token_at
        return AuditRecord(
            user=self.user, thread_id=self.thread_id, request_id=self.request_id,
            prompt_hmac=prompt_hmac, replica=self.replica, tier=self.tier,
            retrieved_chunk_ids=self.retrieved_chunk_ids, cited_chunk_ids=self.cited_chunk_ids,
            verdicts=dict(self.verdicts), prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            ttft_ms=None if first is None else round((first - self.started) * 1000),
            latency_ms=round((ended - self.started) * 1000), outcome=self.conclude(error),
        )  # fmt: skip


_COLUMNS = (
    "id, created_at, user_identifier, thread_id, request_id, prompt_hmac, replica, tier,"
    " retrieved_chunk_ids, cited_chunk_ids, verdicts, prompt_tokens, completion_tokens, ttft_ms,"
    " latency_ms, outcome, prev_hash, hash"
)
_INSERT = f"INSERT INTO audit_log ({_COLUMNS}) VALUES ({', '.join(['%s'] * 18)})"  # noqa: S608
_SELECT = f"SELECT {_COLUMNS} FROM audit_log WHERE id > %s ORDER BY id LIMIT %s"  # noqa: S608


class AuditLog:
    """Appends records to the chain in PostgreSQL (and the JSONL sink when one is set).

    Safe to share between the tasks of a process and across processes (see the module doc).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        hmac_key: SecretStr,
        jsonl_path: Path | None = None,
        metrics: Metrics | None = None,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self._key = hmac_key.get_secret_value().encode("utf-8")
        self._jsonl_path = jsonl_path
        self._metrics = metrics
        self._timeout_s = write_timeout_s

    def prompt_hmac(self, prompt: str) -> str:
        """HMAC-SHA256 of the prompt under the audit key, hex."""
        return hmac.new(self._key, prompt.encode("utf-8"), hashlib.sha256).hexdigest()

    async def append(self, record: AuditRecord) -> ChainedRecord:
        """Chain and store one record (then the JSONL line). Raises DatabaseUnavailable."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute("SELECT hash FROM audit_chain_head FOR UPDATE")
                head = await cur.fetchone()
                cur = await conn.execute("SELECT nextval('audit_log_id_seq'), clock_timestamp()")
                ids = await cur.fetchone()
                if head is None or ids is None:
                    raise DatabaseUnavailable("the audit chain head is missing (migrate)")
                chained = _chain(record, id=ids[0], created_at=ids[1], prev_hash=head[0])
                await conn.execute(_INSERT, _row_values(chained))
                await conn.execute(
                    "UPDATE audit_chain_head SET last_id = %s, hash = %s",
                    (chained.id, chained.hash),
                )
        except psycopg.Error as exc:
            raise DatabaseUnavailable(
                f"audit append failed: {exc.sqlstate or 'no sqlstate'}"
            ) from exc
        if self._jsonl_path is not None:
            try:
                line = canonical_json(
                    {**chained.fields(), "prev_hash": chained.prev_hash, "hash": chained.hash}
                )
                await asyncio.to_thread(_append_line, self._jsonl_path, line)
            except OSError as exc:
                logger.warning("audit record %d not written to the JSONL sink: %s", chained.id, exc)
                self._count_failure("jsonl")
        return chained

    async def record(
        self,
        trail: AuditTrail,
        *,
        prompt: str,
        error: BaseException | None,
        ended: float | None = None,
    ) -> ChainedRecord | None:
        """Seal the trail (`ended`: a `time.monotonic()` reading, default now) and append it.
        Never raises (but cancellation): a record that cannot be written within the write
        timeout is logged and counted, and None returned."""
        ended = time.monotonic() if ended is None else ended
        sealed = trail.seal(prompt_hmac=self.prompt_hmac(prompt), ended=ended, error=error)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self.append(sealed)
        except Exception as exc:  # TimeoutError, DatabaseUnavailable, ...
            logger.warning(
                "audit record of request %s not written: %s: %s",
                trail.request_id, type(exc).__name__, exc,
            )  # fmt: skip
            self._count_failure("database")
            return None

    def _count_failure(self, sink: str) -> None:
        if self._metrics is not None:
            self._metrics.audit_failures.labels(sink).inc()


async def verify(pool: AsyncConnectionPool, *, batch: int = 1000) -> VerifyResult:
    """Walk the chain oldest first, on one snapshot: every record must follow the one before and
    match its own hash, and the newest must be the one the chain head names. Stops at the first
    bad record. Raises DatabaseUnavailable."""
    checked, prev_hash, last_id = 0, GENESIS, 0
    try:
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            head = await (
                await conn.execute("SELECT last_id, hash FROM audit_chain_head")
            ).fetchone()
            if head is None:
                return VerifyResult(False, 0, None, "the chain head row is missing")
            head_id, head_hash = int(head[0]), str(head[1])
            while True:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(_SELECT, (last_id, batch), prepare=False)
                rows = await cur.fetchall()
                if not rows:
                    break
                for row in rows:
                    try:
                        chained = _from_row(row)
                    except (ValueError, TypeError, AttributeError):
                        reason = "its fields are not ones the writer makes: the record was changed"
                        return VerifyResult(False, checked, int(row["id"]), reason)
                    if last_id >= head_id:
                        return VerifyResult(False, checked, chained.id, "not in the chain head")
                    if chained.prev_hash != prev_hash:
                        after = f"record {last_id}" if last_id else "the start"
                        reason = f"does not follow {after}: a record was removed or changed"
                        return VerifyResult(False, checked, chained.id, reason)
                    if chain_hash(prev_hash, chained.fields()) != chained.hash:
                        reason = "its fields do not match its hash: the record was changed"
                        return VerifyResult(False, checked, chained.id, reason)
                    prev_hash, last_id, checked = chained.hash, chained.id, checked + 1
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"audit verify failed: {exc.sqlstate or 'no sqlstate'}") from exc
    if (last_id, prev_hash) != (head_id, head_hash):
        reason = f"the newest records are missing: the chain head ends at record {head_id}"
        return VerifyResult(False, checked, head_id, reason)
    return VerifyResult(True, checked)


def _chain(record: AuditRecord, *, id: int, created_at: datetime, prev_hash: str) -> ChainedRecord:
    unhashed = ChainedRecord(id, created_at, record, prev_hash=prev_hash, hash="")
    return dataclasses.replace(unhashed, hash=chain_hash(prev_hash, unhashed.fields()))


def _row_values(chained: ChainedRecord) -> tuple[Any, ...]:
    r = chained.record
    verdicts = {stage: list(cats) for stage, cats in r.verdicts.items()}
    return (
        chained.id, chained.created_at, r.user, r.thread_id, r.request_id, r.prompt_hmac,
        r.replica, r.tier, list(r.retrieved_chunk_ids), list(r.cited_chunk_ids), Jsonb(verdicts),
        r.prompt_tokens, r.completion_tokens, r.ttft_ms, r.latency_ms, r.outcome.value,
        chained.prev_hash, chained.hash,
    )  # fmt: skip


def _from_row(row: Mapping[str, Any]) -> ChainedRecord:
    """Raises ValueError, TypeError or AttributeError on fields no writer produces."""
    verdicts: dict[str, list[str]] = row["verdicts"]
    record = AuditRecord(
        user=row["user_identifier"], thread_id=row["thread_id"], request_id=row["request_id"],
        prompt_hmac=row["prompt_hmac"], replica=row["replica"], tier=row["tier"],
        retrieved_chunk_ids=tuple(row["retrieved_chunk_ids"]),
        cited_chunk_ids=tuple(row["cited_chunk_ids"]),
        verdicts={str(k): tuple(v) for k, v in verdicts.items()},
        prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
        ttft_ms=row["ttft_ms"], latency_ms=row["latency_ms"], outcome=Outcome(row["outcome"]),
    )  # fmt: skip
    return ChainedRecord(
        id=row["id"], created_at=row["created_at"], record=record,
        prev_hash=row["prev_hash"], hash=row["hash"],
    )  # fmt: skip


def _append_line(path: Path, line: str) -> None:
    """One write(2) on an O_APPEND descriptor: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)
