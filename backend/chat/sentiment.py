"""All-in-One sentiment: the chat model itself labels a message 正面 / 负面 / 中性 before answering.

One tiny request per message: a system prompt that asks for a single word, the message (head and
tail only when long), `max_tokens` 4, non-streaming, `Priority.PROBE` so vLLM runs it ahead of
answers. Temperature is 0.3, never 0: the seed article saw Qwen loop ("正面正面正面……") on vague
messages at 0 and a stable label at 0.3.

The reply must name exactly one label (synonyms in `LABELS` count as theirs); anything else
(two labels, none, junk) is UNKNOWN. So is an engine error or the probe's own timeout: the label is
an extra, it never fails or delays the answer past `timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Mapping

from backend.chat.shaping import Priority
from backend.errors import EngineError
from backend.serving.engine import ChatRequest, Engine, Message

logger = logging.getLogger(__name__)


class Sentiment(enum.StrEnum):
    POSITIVE = "正面"
    NEGATIVE = "负面"
    NEUTRAL = "中性"
    UNKNOWN = "未知"


LABELS: Mapping[str, Sentiment] = {
    "正面": Sentiment.POSITIVE,
    "积极": Sentiment.POSITIVE,
    "负面": Sentiment.NEGATIVE,
    "消极": Sentiment.NEGATIVE,
    "中性": Sentiment.NEUTRAL,
    "中立": Sentiment.NEUTRAL,
}
"""Words in a reply and the label each one means."""

# No "请": the seed article measured Qwen answering such prompts with a polite preamble first.
SYSTEM_PROMPT = (
    "你是情感分析器。判断用户消息的情感倾向，只输出一个词：正面、负面或中性。不要解释，不加标点。"
)
PROBE_TEMPERATURE = 0.3
PROBE_MAX_TOKENS = 4
PROBE_MAX_CHARS = 512  # longer messages: head and tail only (the seed article: 128 each)
PROBE_KEEP_CHARS = 128


def parse_label(reply: str) -> Sentiment:
    """The one label `reply` names, else UNKNOWN (see the module docstring)."""
    found = {label for word, label in LABELS.items() if word in reply}
    return found.pop() if len(found) == 1 else Sentiment.UNKNOWN


def probe_request(text: str) -> ChatRequest:
    """The probe's request for one user message."""
    if len(text) > PROBE_MAX_CHARS:
        text = f"{text[:PROBE_KEEP_CHARS]}……{text[-PROBE_KEEP_CHARS:]}"
    return ChatRequest(
        messages=(Message("system", SYSTEM_PROMPT), Message("user", text)),
        max_tokens=PROBE_MAX_TOKENS,
        temperature=PROBE_TEMPERATURE,
        stream=False,
        priority=Priority.PROBE,
    )


class SentimentProbe:
    """Labels messages with the chat engine. Safe to share between tasks."""

    def __init__(self, engine: Engine, *, timeout_s: float) -> None:
        self._engine = engine
        self._timeout_s = timeout_s

    async def classify(self, text: str) -> Sentiment:
        """The message's sentiment; UNKNOWN on a malformed reply, an engine error or after
        `timeout_s` seconds. Never raises (except CancelledError when the caller cancels)."""
        parts: list[str] = []
        try:
            async with asyncio.timeout(self._timeout_s):
                stream = self._engine.stream(probe_request(text))
                async with contextlib.aclosing(stream) as deltas:
                    async for delta in deltas:
                        parts.append(delta)
        except TimeoutError:
            logger.warning("sentiment probe: no label within %gs", self._timeout_s)
            return Sentiment.UNKNOWN
        except EngineError as exc:
            logger.warning("sentiment probe: %s: %s", type(exc).__name__, exc)
            return Sentiment.UNKNOWN
        reply = "".join(parts)
        label = parse_label(reply)
        if label is Sentiment.UNKNOWN:
            logger.info("sentiment probe: no single label in %r", reply[:40])
        return label
