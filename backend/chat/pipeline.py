"""The conversation pipeline: one user message in, events (queue position, sentiment, notices,
answer tokens) out. ARCHITECTURE.md steps 1-9; chat_ui only renders what this yields.

    input guard ▸ entrance (one Redis script: rate limits, session slot, history) ▸ the priority
    queue when no slot was free ▸ tier ▸ shape ▸ sentiment probe ∥ answer stream (pool: failover
    before the first token; citations, Markdown sanitizing, output guard) ▸ history append ▸
    audit record (PostgreSQL, every outcome)

Concurrency: one `ChatPipeline` serves every conversation of a chat_ui process; all shared state is
in Redis or in the engine pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field

from backend.audit import AuditLog, AuditTrail
from backend.audit import Outcome as Audited
from backend.chat.canary import CANARY_RULE, LEAK_CATEGORY, CanaryFilter
from backend.chat.entrance import Entrance, Entry
from backend.chat.events import (
    Cited,
    Done,
    Event,
    Notice,
    NoticeKind,
    Outcome,
    Queued,
    Retrieved,
    SentimentLabel,
    Token,
)
from backend.chat.grounding import (
    KB_RULES,
    NO_SOURCES_ANSWER,
    CitationFilter,
    Knowledge,
    Retriever,
    Sources,
    screen_hits,
    sources_context,
)
from backend.chat.history import History
from backend.chat.markdown import MarkdownFilter
from backend.chat.sentiment import SentimentProbe
from backend.chat.shaping import Priority, Shaper, Tier, retrieval_top_k
from backend.chat.streaming import filtered, prepend, screened
from backend.errors import (
    EngineRestarting,
    EngineTimeout,
    EngineUnavailable,
    QueueFull,
    QueueTimeout,
    RateLimited,
)
from backend.guard import Hit, LexiconStore, Matcher, Severity, StreamGuard
from backend.metrics import GuardStage, Metrics
from backend.ratelimit import RateLimiter
from backend.serving.degrade import choose_tier
from backend.serving.engine import ChatRequest, Message
from backend.serving.pool import EnginePool, Started
from backend.serving.queue import Position, WaitQueue
from backend.serving.slots import Lease, SlotTable
from backend.serving.status import ProcessState, StatusBoard
from backend.serving.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

QUEUE_LONG_CHARS = 600
BUSY_TEXT = "当前使用人数较多，请约 {retry} 秒后再试。"
DEGRADED_TEXT = "当前访问量较大，本次回答会更简短。"
INPUT_BLOCKED_TEXT = "您的消息包含不被允许的内容（{category}），未发送给模型。请修改后重试。"
OUTPUT_BLOCKED_TEXT = "抱歉，这个回答包含不被允许的内容，已停止显示。请换个问题试试。"
CONDENSED_TEXT = "您的输入过长，已保留开头和结尾、压缩了中间部分后再回答。"


@dataclass(frozen=True)
class PipelineConfig:
    system_prompt: str
    slots_per_replica: int
    queue_wait_budget_s: float
    warmup: bool = False
    engine_processes: tuple[str, ...] = ("engine",)
    top_k: int = 5  # chunks a knowledge-base answer is given at Tier.NORMAL
    canary: str | None = None  # in the system prompt; an answer repeating it is stopped
    stream_batch_chars: int = 16  # the answer guard scans once this many chars wait ...
    stream_max_delay_s: float = 0.005  # ... or this long after its last scan
    link_hosts: tuple[str, ...] = ()  # hosts answers may link to (GuardSettings.link_hosts)


@dataclass(frozen=True)
class Turn:
    """One user message. `stream` None lets shaping decide; True/False is the user's choice.
    `user` is the login identifier (rate limits and audit; empty: limited per thread)."""

    thread_id: str
    text: str
    stream: bool | None = None
    user: str = ""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    knowledge: Knowledge | None = None  # set: answer from the knowledge base, with citations


class ChatPipeline:
    def __init__(
        self,
        *,
        pool: EnginePool,
        slots: SlotTable,
        queue: WaitQueue,
        shaper: Shaper,
        history: History,
        status: StatusBoard,
        sentiment: SentimentProbe | None,
        config: PipelineConfig,
        metrics: Metrics | None = None,
        guard: LexiconStore | None = None,
        audit: AuditLog | None = None,
        limiter: RateLimiter | None = None,
        retriever: Retriever | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """`guard`, `audit`, `limiter` None: no guard, no audit records, no rate limits;
        `retriever` None: knowledge-base turns are answered without sources; `tokenizer` (the
        engine's) counts the tokens of answers returned whole, None: such an answer counts as
        one (a streamed delta is one token)."""
        self._pool = pool
        self._slots = slots
        self._queue = queue
        self._shaper = shaper
        self._history = history
        self._status = status
        self._sentiment = sentiment
        self._config = config
        self._metrics = metrics
        self._guard = guard
        self._audit = audit
        self._limiter = limiter
        self._retriever = retriever
        self._tokenizer = tokenizer
        self._entrance = Entrance(
            queue.client, limiter=limiter, queue=queue, slots=slots, history=history
        )
        self._background: set[asyncio.Task[None]] = set()
        self._expected: Matcher | None = None  # the lexicon whose guard_hits series exist
        if guard is not None:
            self._matcher()

    async def prepare(self, thread_id: str) -> Lease | None:
        """On a new conversation, with warm-up on: take a slot if one is free and prefill the
        system prompt on its replica, so the first message only pays for itself (worth it for
        long system prompts). Never waits in the queue; does nothing with warm-up off."""
        if not self._config.warmup or await self._queue.depth() > 0:
            return None
        lease = await self._slots.acquire(thread_id, replicas=self._replicas())
        if lease is not None and lease.new:
            self._warm_up(lease.replica)
        return lease

    async def release(self, thread_id: str) -> None:
        """The conversation's browser went away: free its slot now rather than at lease expiry."""
        await self._slots.release(thread_id)

    def _warm_up(self, replica: str) -> None:
        request = ChatRequest(
            messages=(Message(role="system", content=self._config.system_prompt),),
            max_tokens=1,
            temperature=0.1,
            stream=False,
        )
        task = asyncio.create_task(self._pool.warm_up(replica, request))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _replicas(self) -> list[str]:
        return self._pool.available()

    def _matcher(self) -> Matcher:
        """The guard's lexicon in force; a new one has its guard_hits series created at zero."""
        assert self._guard is not None
        matcher = self._guard.current()
        if matcher is not self._expected and self._metrics is not None:
            entries = [p.entry for p in matcher.patterns if p.entry is not None]
            pairs = {(entry.category, entry.severity.value) for entry in entries}
            self._metrics.expect_guard_hits(GuardStage.INPUT, pairs)
            self._metrics.expect_guard_hits(GuardStage.RETRIEVAL, pairs)
            # the answer guard acts on block and mask words only
            streamed = {pair for pair in pairs if pair[1] != Severity.FLAG}
            if self._config.canary:
                streamed.add((LEAK_CATEGORY, Severity.BLOCK.value))
            self._metrics.expect_guard_hits(GuardStage.OUTPUT, streamed)
        self._expected = matcher
        return matcher

    def _count_hits(self, stage: GuardStage, hits: Iterable[Hit]) -> None:
        if self._metrics is not None:
            self._metrics.count_guard_hits(stage, ((h.category, h.severity.value) for h in hits))

    async def answer(self, turn: Turn) -> AsyncGenerator[Event, None]:
        """Yield the events of one answer (see `_answer`), counted in the metrics and, whatever
        the outcome, recorded in the audit log before this generator ends (a failed write is
        logged and counted, never raised). Raises RateLimited and what `_answer` raises."""
        started, first_at, outcome = time.monotonic(), None, "error"
        metrics = self._metrics
        trail = AuditTrail(
            user=turn.user, thread_id=turn.thread_id, request_id=turn.request_id, started=started
        )
        error: BaseException | None = None
        try:
            async with contextlib.aclosing(self._answer(turn, trail)) as events:
                async for event in events:
                    if isinstance(event, Token) and first_at is None:
                        first_at = trail.first_token_at = time.monotonic()
                        if metrics is not None:
                            metrics.ttft.observe(first_at - started)
                    elif isinstance(event, Done):
                        outcome, trail.finished = event.outcome.value, True
                        if metrics is not None:
                            metrics.tier.labels(event.tier.name.lower()).inc()
                            metrics.tokens.inc(event.prompt_tokens)
                    yield event
        except EngineTimeout as exc:
            outcome, error = "timeout", exc
            raise
        except (GeneratorExit, asyncio.CancelledError) as exc:
            outcome, error = "aborted", exc
            raise
        except BaseException as exc:
            outcome, error = "rate_limited" if isinstance(exc, RateLimited) else "error", exc
            raise
        finally:
            if metrics is not None:
                metrics.requests.labels(outcome).inc()
                metrics.completion_tokens.inc(trail.completion_tokens)
                if first_at is not None:
                    metrics.latency.observe(time.monotonic() - started)
            if self._audit is not None:  # shielded: a second cancel must not lose the record
                await asyncio.shield(self._audit.record(trail, prompt=turn.text, error=error))

    async def _answer(self, turn: Turn, trail: AuditTrail) -> AsyncGenerator[Event, None]:
        """Guard the message (blocked: a notice, no engine call), apply the user's rate limits,
        serve it (`_serve`), then charge its prompt + completion tokens to the user, whatever the
        outcome. Raises RateLimited, RedisUnavailable, and what `_serve` raises."""
        if self._guard is not None:
            verdict = self._matcher().check(turn.text)
            trail.verdict("input", (hit.category for hit in verdict.hits))
            self._count_hits(GuardStage.INPUT, verdict.hits)
            if verdict.blocked:
                trail.outcome = Audited.BLOCKED_INPUT
                category = next(h.category for h in verdict.hits if h.severity.value == "block")
                yield Notice(NoticeKind.BLOCKED_INPUT, INPUT_BLOCKED_TEXT.format(category=category))
                yield Done(Outcome.BLOCKED, None, Tier.NORMAL, None, 0, False)
                return
        key = turn.user or f"thread:{turn.thread_id}"
        entering = self._entrance.enter(
            key, request_id=turn.request_id, thread_id=turn.thread_id, replicas=self._replicas()
        )
        try:
            async with (
                entering as entry,
                contextlib.aclosing(self._serve(turn, trail, entry)) as events,
            ):
                async for event in events:
                    yield event
        finally:  # stopped and failed answers cost what the engine did
            if self._limiter is not None and trail.prompt_tokens:
                await self._limiter.charge(key, trail.prompt_tokens + trail.completion_tokens)

    async def _serve(
        self, turn: Turn, trail: AuditTrail, entry: Entry
    ) -> AsyncGenerator[Event, None]:
        """Yield the events of one admitted answer; `entry` is what it found on its way in.

        Raises RedisUnavailable, EngineError (EngineRestarting while the supervisor restarts the
        engine). If the consumer stops early (user stop, disconnect) the upstream request is
        closed and the partial answer recorded, so the next turn sees what the user saw.
        """
        waited_from = time.monotonic()
        # The entrance renewed a held lease or, when nobody waits, took a free slot; otherwise
        # the line at once (its polls take a slot in turn, so a newcomer never jumps it).
        seated = entry.seated
        if seated is None:
            try:
                # Short messages go first; the queue orders before shaping, so it judges by length.
                long = len(turn.text) > QUEUE_LONG_CHARS
                line = self._queue.line(
                    turn.thread_id, slots=self._slots, replicas=self._replicas,
                    priority=Priority.LONG if long else Priority.INTERACTIVE,
                    budget_s=self._config.queue_wait_budget_s, seat_first=False,
                )  # fmt: skip
                async for item in line:
                    if isinstance(item, Position):
                        yield Queued(item)
                    else:
                        seated = item
            except (QueueTimeout, QueueFull) as exc:
                full = isinstance(exc, QueueFull)
                trail.outcome = Audited.QUEUE_FULL if full else Audited.QUEUE_TIMEOUT
                retry = max(5, round(self._config.queue_wait_budget_s / 2))
                yield Notice(NoticeKind.BUSY, BUSY_TEXT.format(retry=retry), float(retry))
                yield Done(Outcome.REFUSED, None, Tier.BUSY, None, 0, False)
                return
        assert seated is not None
        lease, depth = seated.lease, seated.waiting
        trail.replica = lease.replica
        waited = time.monotonic() - waited_from
        available = self._replicas()
        if self._metrics is not None:
            self._metrics.queue_wait.observe(waited)
            self._metrics.queue_depth.set(depth)
        tier = choose_tier(
            queue_depth=depth,
            capacity=self._config.slots_per_replica * len(available),
            load=self._pool.pressure(),
            waited_fraction=waited / max(self._config.queue_wait_budget_s, 1e-9),
        )
        trail.tier = tier.name.lower()
        if tier is Tier.BUSY:
            trail.outcome = Audited.REFUSED_BUSY
            yield Notice(NoticeKind.BUSY, BUSY_TEXT.format(retry=10), 10.0)
            yield Done(Outcome.REFUSED, lease.replica, tier, None, 0, False)
            return
        system_prompt, sources = self._config.system_prompt, None
        if self._config.canary:
            system_prompt += CANARY_RULE.format(canary=self._config.canary)
        if turn.knowledge is not None:
            system_prompt = f"{system_prompt}\n\n{KB_RULES}"
            retrieving_from = time.monotonic()
            sources = await self._retrieve(turn, turn.knowledge, tier=tier, trail=trail)
            yield Retrieved(sources, time.monotonic() - retrieving_from)
            if not sources.hits:  # nothing to answer from: say so, no engine call
                await self._history.append(
                    turn.thread_id, Message(role="user", content=turn.text),
                    Message(role="assistant", content=NO_SOURCES_ANSWER),
                )  # fmt: skip
                yield Token(NO_SOURCES_ANSWER)
                yield Done(Outcome.OK, None, tier, None, 0, False)
                return
        shaped = await self._shaper.shape(
            turn.text,
            history=entry.history,
            system_prompt=system_prompt,
            tier=tier,
            stream_override=turn.stream,
            context=sources_context(sources) if sources else None,
        )
        trail.prompt_tokens = shaped.prompt_tokens
        if shaped.condensed:
            yield Notice(NoticeKind.CONDENSED, CONDENSED_TEXT)
        if tier >= Tier.REDUCED:
            yield Notice(NoticeKind.DEGRADED, DEGRADED_TEXT)
        probe = (
            asyncio.create_task(self._sentiment.classify(turn.text))
            if self._sentiment is not None
            else None
        )
        order = [lease.replica, *(u for u in available if u != lease.replica)]
        parts: list[str] = []
        blocked = False
        whole: str | None = None  # an answer returned in one piece, not streamed
        screen: StreamGuard | None = None
        canary: CanaryFilter | None = None
        started_at = time.monotonic()
        # model output never makes the browser fetch or run anything, nor link off the allow-list
        markdown = MarkdownFilter(link_hosts=self._config.link_hosts)
        try:
            started = await self._start(shaped.request, order)
            trail.replica = started.replica
            whole = None if shaped.request.stream else started.first
            if probe is not None:
                yield SentimentLabel(await probe)
            if started.replica != lease.replica:  # failed over: pin the session where it is now
                await self._slots.acquire(turn.thread_id, replicas=[started.replica])
                if self._metrics is not None:
                    self._metrics.failovers.inc()
            screen = (
                StreamGuard(
                    self._matcher(),
                    batch_chars=self._config.stream_batch_chars,
                    max_delay_s=self._config.stream_max_delay_s,
                )
                if self._guard is not None
                else None
            )
            citations = CitationFilter(count=len(sources.hits)) if sources else None
            canary = CanaryFilter(self._config.canary) if self._config.canary else None
            async with (
                contextlib.aclosing(started.rest) as rest,
                contextlib.aclosing(prepend(started.first, rest, trail.count_delta)) as deltas,
                contextlib.aclosing(filtered(deltas, canary)) as unleaked,
                contextlib.aclosing(filtered(unleaked, citations)) as checked,
                contextlib.aclosing(filtered(checked, markdown)) as safe,
                contextlib.aclosing(screened(safe, screen)) as releases,
            ):
                async for release in releases:
                    if release.text:
                        parts.append(release.text)
                        yield Token(release.text, arrived=release.arrived)
                    if release.blocked is not None:
                        blocked = True
                        trail.verdict("output", (hit.category for hit in release.blocked.hits))
                        break  # leaving the `async with` closes the upstream response
                    if canary is not None and canary.tripped:
                        blocked = True
                        trail.verdict("output", (LEAK_CATEGORY,))
                        break
            if canary is not None and canary.tripped and not blocked:  # at the very end
                blocked = True
                trail.verdict("output", (LEAK_CATEGORY,))
            if screen is not None and not blocked:
                trail.verdict("output", ())
            if blocked:
                trail.outcome = Audited.BLOCKED_OUTPUT
                parts = [OUTPUT_BLOCKED_TEXT]  # history keeps what replaced the answer
                yield Notice(NoticeKind.BLOCKED_OUTPUT, OUTPUT_BLOCKED_TEXT)
        finally:
            if probe is not None and not probe.done():
                probe.cancel()
            if whole and self._tokenizer is not None:  # its one delta counted as one token
                trail.completion_tokens = await self._tokenizer.count(whole)
            if screen is not None:  # what the answer guard acted on: blocks and masks
                self._count_hits(GuardStage.OUTPUT, screen.verdict.hits)
            if canary is not None and canary.tripped and self._metrics is not None:
                leak = (LEAK_CATEGORY, Severity.BLOCK.value)
                self._metrics.count_guard_hits(GuardStage.OUTPUT, (leak,))
            if self._metrics is not None:
                self._metrics.count_sanitized(markdown.removed.items())
            if parts:
                await self._history.append(
                    turn.thread_id,
                    Message(role="user", content=turn.text),
                    Message(role="assistant", content="".join(parts)),
                )
                await self._queue.record_turn(time.monotonic() - started_at)
        if sources is not None and citations is not None:
            numbers = tuple(citations.cited)
            trail.cited_chunk_ids = tuple(sources.hits[n - 1].chunk_id for n in numbers)
            if self._metrics is not None and citations.removed:
                self._metrics.citations_removed.inc(citations.removed)
            yield Cited(sources, numbers, citations.removed)
        outcome = Outcome.DEGRADED if tier >= Tier.REDUCED else Outcome.OK
        outcome = Outcome.BLOCKED if blocked else outcome
        yield Done(outcome, started.replica, tier, shaped.task, shaped.prompt_tokens, shaped.stream)

    async def _retrieve(
        self, turn: Turn, knowledge: Knowledge, *, tier: Tier, trail: AuditTrail
    ) -> Sources:
        """The chunks for this turn, fewer under load, screened by the guard. Raises
        KnowledgeBaseError (RagUnavailable when the worker cannot be reached)."""
        if self._retriever is None:
            return Sources(())
        hits = await self._retriever.retrieve(
            turn.text, user=turn.user, kbs=knowledge.kbs,
            top_k=retrieval_top_k(tier, top_k=self._config.top_k),
        )  # fmt: skip
        sources = screen_hits(
            hits,
            self._matcher() if self._guard is not None else None,
            seen=lambda verdict: self._count_hits(GuardStage.RETRIEVAL, verdict.hits),
        )
        trail.retrieved_chunk_ids = tuple(hit.chunk_id for hit in sources.hits)
        trail.verdict("retrieval", ("withheld",) * min(sources.dropped, 1))
        return sources

    async def _start(self, request: ChatRequest, order: Sequence[str]) -> Started:
        try:
            return await self._pool.start(request, order=order)
        except EngineUnavailable as exc:
            for name in self._config.engine_processes:
                status = await self._status.get(name)
                if status is not None and status.state in (
                    ProcessState.RESTARTING,
                    ProcessState.STARTING,
                ):
                    raise EngineRestarting(str(exc)) from exc
            raise

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
