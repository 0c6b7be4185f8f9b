"""The conversation pipeline: one user message in, streamed answer text out.

Issue-2 scope: history from Redis, the system prompt, history trimmed to a character budget,
an engine stream, the exchange appended to history. Later stages (guard, slots, shaping, retrieval,
audit) slot in here, never in chat_ui.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backend.chat.history import History
from backend.errors import EngineRestarting, EngineUnavailable
from backend.serving.engine import ChatRequest, Engine, Message
from backend.serving.status import ProcessState, StatusBoard

logger = logging.getLogger(__name__)

ENGINE_PROCESS = "engine"


@dataclass(frozen=True)
class PipelineConfig:
    system_prompt: str
    max_tokens: int
    temperature: float
    history_char_budget: int = 6000


def trim_history(messages: list[Message], *, char_budget: int) -> list[Message]:
    """The newest whole user/assistant messages whose total length fits the budget, oldest first."""
    kept: list[Message] = []
    used = 0
    for message in reversed(messages):
        used += len(message.content)
        if used > char_budget:
            break
        kept.append(message)
    kept.reverse()
    while kept and kept[0].role != "user":  # never open on an orphan assistant reply
        kept.pop(0)
    return kept


class ChatPipeline:
    def __init__(
        self,
        *,
        engine: Engine,
        history: History,
        status: StatusBoard,
        config: PipelineConfig,
    ) -> None:
        self._engine = engine
        self._history = history
        self._status = status
        self._config = config

    def build_request(self, past: list[Message], text: str, *, stream: bool = True) -> ChatRequest:
        messages = (
            Message(role="system", content=self._config.system_prompt),
            *trim_history(past, char_budget=self._config.history_char_budget),
            Message(role="user", content=text),
        )
        return ChatRequest(
            messages=messages,
            max_tokens=self._config.max_tokens,
            temperature=self._config.temperature,
            stream=stream,
        )

    async def answer(self, thread_id: str, text: str) -> AsyncIterator[str]:
        """Stream the answer's text deltas.

        Raises RedisUnavailable, EngineError (EngineRestarting when the supervisor is restarting the
        engine). If the consumer stops early (user stop, disconnect), the partial answer is still
        recorded so the next turn sees what the user saw.
        """
        past = await self._history.load(thread_id)
        request = self.build_request(past, text)
        parts: list[str] = []
        try:
            async with contextlib.aclosing(self._engine.stream(request)) as deltas:
                async for delta in deltas:
                    parts.append(delta)
                    yield delta
        except EngineUnavailable as exc:
            status = await self._status.get(ENGINE_PROCESS)
            if status is not None and status.state in (
                ProcessState.RESTARTING,
                ProcessState.STARTING,
            ):
                raise EngineRestarting(str(exc)) from exc
            raise
        finally:
            if parts:
                await self._history.append(
                    thread_id,
                    Message(role="user", content=text),
                    Message(role="assistant", content="".join(parts)),
                )
