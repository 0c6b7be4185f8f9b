"""The conversation pipeline: one user message in, events (queue position, sentiment, notices,
answer tokens) out. ARCHITECTURE.md steps 3-8; chat_ui only renders what this yields.

    history (Redis) ▸ session slot (Redis lease, or the priority queue) ▸ tier ▸ shape
    ▸ sentiment probe ∥ answer stream (pool: failover before the first token) ▸ history append

Concurrency: one `ChatPipeline` serves every conversation of a chat_ui process; all shared state is
in Redis or in the engine pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from backend.chat.events import (
    Done,
    Event,
    Notice,
    NoticeKind,
    Outcome,
    Queued,
    SentimentLabel,
    Token,
)
from backend.chat.history import History
from backend.chat.sentiment import SentimentProbe
from backend.chat.shaping import Priority, Shaper, Tier
from backend.errors import (
    EngineError,
    EngineRestarting,
    EngineTimeout,
    EngineUnavailable,
    QueueFull,
    QueueTimeout,
)
from backend.guard import LexiconStore, Release, StreamGuard
from backend.metrics import Metrics
from backend.serving.degrade import choose_tier
from backend.serving.engine import ChatRequest, Message
from backend.serving.pool import EnginePool, Started
from backend.serving.queue import Position, WaitQueue
from backend.serving.slots import Lease, SlotTable
from backend.serving.status import ProcessState, StatusBoard

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


@dataclass(frozen=True)
class Turn:
    """One user message. `stream` None lets shaping decide; True/False is the user's choice."""

    thread_id: str
    text: str
    stream: bool | None = None


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
    ) -> None:
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
        self._background: set[asyncio.Task[None]] = set()

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

    async def answer(self, turn: Turn) -> AsyncGenerator[Event, None]:
        """Yield the events of one answer (see `_answer`), counted in the metrics."""
        started, first_at, outcome = time.monotonic(), None, "error"
        metrics = self._metrics
        try:
            async with contextlib.aclosing(self._answer(turn)) as events:
                async for event in events:
                    if isinstance(event, Token) and first_at is None:
                        first_at = time.monotonic()
                        if metrics is not None:
                            metrics.ttft.observe(first_at - started)
                    elif isinstance(event, Done):
                        outcome = event.outcome.value
                        if metrics is not None:
                            metrics.tier.labels(event.tier.name.lower()).inc()
                            metrics.tokens.inc(event.prompt_tokens)
                    yield event
        except EngineTimeout:
            outcome = "timeout"
            raise
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "aborted"
            raise
        finally:
            if metrics is not None:
                metrics.requests.labels(outcome).inc()
                if first_at is not None:
                    metrics.latency.observe(time.monotonic() - started)

    async def _answer(self, turn: Turn) -> AsyncGenerator[Event, None]:
        """Yield the events of one answer.

        Raises RedisUnavailable, EngineError (EngineRestarting while the supervisor restarts the
        engine). If the consumer stops early (user stop, disconnect) the upstream request is
        closed and the partial answer recorded, so the next turn sees what the user saw.
        """
        if self._guard is not None:
            verdict = self._guard.current().check(turn.text)
            if verdict.blocked:
                category = next(h.category for h in verdict.hits if h.severity.value == "block")
                yield Notice(NoticeKind.BLOCKED_INPUT, INPUT_BLOCKED_TEXT.format(category=category))
                yield Done(Outcome.BLOCKED, None, Tier.NORMAL, None, 0, False)
                return
        past = await self._history.load(turn.thread_id)
        waited_from = time.monotonic()
        # Always through the queue: it renews a held lease at once and takes a free slot on its
        # first poll when nobody waits, so a newcomer never jumps the line.
        lease: Lease | None = None
        try:
            # Short messages go first; the queue orders before shaping, so it judges by length.
            long = len(turn.text) > QUEUE_LONG_CHARS
            priority = Priority.LONG if long else Priority.INTERACTIVE
            async for item in self._wait_in_line(turn.thread_id, priority=priority):
                if isinstance(item, Position):
                    yield Queued(item)
                else:
                    lease = item
        except (QueueTimeout, QueueFull):
            retry = max(5, round(self._config.queue_wait_budget_s / 2))
            yield Notice(NoticeKind.BUSY, BUSY_TEXT.format(retry=retry), float(retry))
            yield Done(Outcome.REFUSED, None, Tier.BUSY, None, 0, False)
            return
        assert lease is not None
        waited = time.monotonic() - waited_from
        available = self._replicas()
        depth = await self._queue.depth()
        if self._metrics is not None:
            self._metrics.queue_wait.observe(waited)
            self._metrics.queue_depth.set(depth)
        tier = choose_tier(
            queue_depth=depth,
            capacity=self._config.slots_per_replica * len(available),
            load=self._pool.pressure(),
            waited_fraction=waited / max(self._config.queue_wait_budget_s, 1e-9),
        )
        if tier is Tier.BUSY:
            yield Notice(NoticeKind.BUSY, BUSY_TEXT.format(retry=10), 10.0)
            yield Done(Outcome.REFUSED, lease.replica, tier, None, 0, False)
            return
        shaped = await self._shaper.shape(
            turn.text,
            history=past,
            system_prompt=self._config.system_prompt,
            tier=tier,
            stream_override=turn.stream,
        )
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
        started_at = time.monotonic()
        try:
            started = await self._start(shaped.request, order)
            if probe is not None:
                yield SentimentLabel(await probe)
            if started.replica != lease.replica:  # failed over: pin the session where it is now
                await self._slots.acquire(turn.thread_id, replicas=[started.replica])
                if self._metrics is not None:
                    self._metrics.failovers.inc()
            screen = StreamGuard(self._guard.current()) if self._guard is not None else None
            async with (
                contextlib.aclosing(started.rest) as rest,
                contextlib.aclosing(_prepend(started.first, rest)) as deltas,
                contextlib.aclosing(_screened(deltas, screen)) as releases,
            ):
                async for release in releases:
                    if release.text:
                        parts.append(release.text)
                        yield Token(release.text)
                    if release.blocked is not None:
                        blocked = True
                        break  # leaving the `async with` closes the upstream response
            if blocked:
                parts = [OUTPUT_BLOCKED_TEXT]  # history keeps what replaced the answer
                yield Notice(NoticeKind.BLOCKED_OUTPUT, OUTPUT_BLOCKED_TEXT)
        finally:
            if probe is not None and not probe.done():
                probe.cancel()
            if parts:
                await self._history.append(
                    turn.thread_id,
                    Message(role="user", content=turn.text),
                    Message(role="assistant", content="".join(parts)),
                )
                await self._queue.record_turn(time.monotonic() - started_at)
        outcome = Outcome.DEGRADED if tier >= Tier.REDUCED else Outcome.OK
        outcome = Outcome.BLOCKED if blocked else outcome
        yield Done(outcome, started.replica, tier, shaped.task, shaped.prompt_tokens, shaped.stream)

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

    async def _wait_in_line(
        self, thread_id: str, *, priority: int
    ) -> AsyncGenerator[Position | Lease, None]:
        """Positions while waiting, then the lease. Raises QueueTimeout, QueueFull."""
        positions: asyncio.Queue[Position] = asyncio.Queue()

        async def report(position: Position) -> None:
            positions.put_nowait(position)

        waiter = asyncio.create_task(
            self._queue.wait_for_slot(
                thread_id,
                slots=self._slots,
                replicas=self._replicas,
                priority=priority,
                budget_s=self._config.queue_wait_budget_s,
                on_position=report,
            )
        )
        try:
            while not waiter.done():
                getter = asyncio.create_task(positions.get())
                done, _ = await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            yield waiter.result()
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()


async def _prepend(first: str, rest: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """`first` (when not empty), then the rest of the stream."""
    if first:
        yield first
    async for delta in rest:
        yield delta


async def _screened(
    deltas: AsyncGenerator[str, None], screen: StreamGuard | None
) -> AsyncGenerator[Release, None]:
    """What may be shown of the stream: every delta through the guard's hold-back filter, then the
    held-back tail once the stream ends -- or fails, since what the engine did say is still
    checked and shown. Stops after a blocked release. Without a guard, deltas pass as they are."""
    if screen is None:
        async for delta in deltas:
            yield Release(delta)
        return
    try:
        async for delta in deltas:
            release = screen.feed(delta)
            yield release
            if release.blocked is not None:
                return
    except EngineError:
        yield screen.finish()
        raise
    yield screen.finish()
