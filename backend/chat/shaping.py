"""Request shaping: one user message (+ history, system prompt, retrieved sources) → one ChatRequest.

The policy is three tables (`TASKS`, `TIERS`, `TASK_RULES`) and a few numbers (`Policy`);
`render_table` prints the task × tier grid. What `Shaper.shape` decides, in order:

- task: the first `TASK_RULES` pattern matching the user's text, else chat → temperature (never 0:
  Qwen can loop at 0), top_p, presence_penalty and a share of the settings' max_tokens.
- answer cap: max_tokens × task share × tier share, at least `min_answer_tokens` (Qwen cuts
  sentences off below ~64), within the tier's cap, the settings' cap and `answer_window_share` of
  the context window.
- prompt budget, `context_window - margin_tokens - answer cap`, counted with the engine's tokenizer
  (ChatML framing included): the user's message first (if it alone is too long, head and tail kept
  and the middle replaced by a marker giving the characters left out: `Shaped.condensed`), then
  retrieved sources (≤ `context_share`, scaled by the tier, cut at the tail so the best-ranked
  stay), then history: newest whole messages, never opening on an assistant reply.
- max_tokens: the answer cap, never past `context_window - prompt_tokens - margin_tokens`.
- stream: on when the user's message is ≤ `stream_max_input_tokens`, off above (the seed article's
  rule: stream prompts under ~200, return long-text jobs whole; it measured characters, we count
  tokens); the user's chat setting overrides either way.
- priority (vLLM: lower runs sooner): INTERACTIVE for short messages, LONG above that threshold,
  PROBE for the sentiment probe. INTERACTIVE is 0, vLLM's default, because vLLM without
  `--scheduling-policy priority` refuses any other value.

Tiers (chosen in backend/serving/degrade.py): REDUCED halves the answer and the sources, BRIEF asks
for one sentence (≤ 64 tokens, stop at a blank line), BUSY makes no request at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from backend.chat.policy import (
    DEFAULT_POLICY,
    MIDDLE_MARKER,
    SOURCES_TEMPLATE,
    TAIL_MARKER,
    TASK_RULES,
    TASKS,
    TIERS,
    Policy,
    Priority,
    Sampling,
    Task,
    Tier,
    TierLimits,
    answer_cap,
    detect_task,
    render_table,
    retrieval_top_k,
)
from backend.errors import ConfigError
from backend.serving.engine import ChatRequest, Message
from backend.serving.tokenizer import (
    CHATML_MESSAGE_OVERHEAD,
    CHATML_REPLY_PRIMER,
    Tokenizer,
    fit,
)

__all__ = [
    "DEFAULT_POLICY",
    "MIDDLE_MARKER",
    "SOURCES_TEMPLATE",
    "TAIL_MARKER",
    "TASKS",
    "TASK_RULES",
    "TIERS",
    "Policy",
    "Priority",
    "Sampling",
    "Shaped",
    "Shaper",
    "Task",
    "Tier",
    "TierLimits",
    "answer_cap",
    "detect_task",
    "render_table",
    "retrieval_top_k",
]


@dataclass(frozen=True)
class Shaped:
    """A shaped request and why. `prompt_tokens` counts the whole prompt (ChatML framing and reply
    primer included); `condensed`: the user's message lost its middle; `context_truncated`: the
    retrieved sources lost their tail (or were left out)."""

    request: ChatRequest
    task: Task
    tier: Tier
    prompt_tokens: int
    stream: bool
    condensed: bool
    history_kept: int
    history_dropped: int
    context_truncated: bool = False


class Shaper:
    """Shapes requests for one engine (its tokenizer and context window). Safe to share between
    tasks: it holds no per-request state."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        context_window: int,
        max_tokens: int,
        policy: Policy = DEFAULT_POLICY,
    ) -> None:
        self._tokenizer = tokenizer
        self._window = context_window
        self._max_tokens = max_tokens
        self._policy = policy

    async def shape(
        self,
        text: str,
        *,
        history: Sequence[Message],
        system_prompt: str,
        tier: Tier = Tier.NORMAL,
        stream_override: bool | None = None,
        context: str | None = None,
    ) -> Shaped:
        """Raises ValueError for Tier.BUSY (the caller shows a busy notice instead) and
        ConfigError when the system prompt leaves no room for a message in the context window."""
        policy, limits = self._policy, self._policy.tiers[tier]
        task = detect_task(text, policy=policy)
        cap = answer_cap(task, tier=tier, max_tokens=self._max_tokens,
                         context_window=self._window, policy=policy)  # fmt: skip
        system = f"{system_prompt}\n\n{limits.instruction}" if limits.instruction else system_prompt
        wrapper = SOURCES_TEMPLATE.format(context="", text="") if context else ""
        texts = [system, text, context or "", wrapper, *(m.content for m in history)]
        (
            system_tokens,
            text_tokens,
            context_tokens,
            wrapper_tokens,
            *history_tokens,
        ) = await self._count_all(texts)
        fixed = system_tokens + 2 * CHATML_MESSAGE_OVERHEAD + CHATML_REPLY_PRIMER
        available = self._window - policy.margin_tokens - cap - fixed
        if available < policy.min_message_tokens:
            raise ConfigError(
                f"the system prompt ({system_tokens} tokens) leaves no room for a message in a "
                f"{self._window}-token context window; shorten it or raise the window"
            )
        sources_cap = int(available * policy.context_share * limits.chunk_share)
        sources_tokens = context_tokens + wrapper_tokens if context else 0
        message_limit = max(available - min(sources_tokens, sources_cap), policy.min_message_tokens)
        message, message_tokens = text, text_tokens
        if condensed := text_tokens > message_limit:
            message, message_tokens = await fit(self._tokenizer, text, limit=message_limit,
                                                tokens=text_tokens, head_share=policy.head_share,
                                                marker=MIDDLE_MARKER)  # fmt: skip
        sources_limit = min(sources_cap, available - message_tokens)
        if truncated := context is not None and sources_tokens > sources_limit:
            room = sources_limit - wrapper_tokens
            if room < policy.min_message_tokens:  # not even a useful piece fits: leave them out
                context, sources_tokens = None, 0
            else:
                context, kept_tokens = await fit(self._tokenizer, context or "", limit=room,
                                                 tokens=context_tokens, head_share=1.0,
                                                 marker=TAIL_MARKER)  # fmt: skip
                sources_tokens = kept_tokens + wrapper_tokens
        if context:
            message = SOURCES_TEMPLATE.format(context=context, text=message)
        kept, history_used = _trim_history(
            history, history_tokens, budget=available - message_tokens - sources_tokens
        )
        prompt_tokens = fixed + message_tokens + sources_tokens + history_used
        short = text_tokens <= policy.stream_max_input_tokens
        stream = short if stream_override is None else stream_override
        sampling = policy.tasks[task]
        request = ChatRequest(
            messages=(Message("system", system), *kept, Message("user", message)),
            max_tokens=min(cap, self._window - prompt_tokens - policy.margin_tokens),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            presence_penalty=sampling.presence_penalty,
            stop=limits.stop,
            stream=stream,
            priority=Priority.INTERACTIVE if short else Priority.LONG,
        )
        return Shaped(
            request=request, task=task, tier=tier, prompt_tokens=prompt_tokens, stream=stream,
            condensed=condensed, history_kept=len(kept), history_dropped=len(history) - len(kept),
            context_truncated=truncated,
        )  # fmt: skip

    async def _count_all(self, texts: Sequence[str]) -> list[int]:
        """Token counts of `texts`: those the tokenizer knows at once (the system prompt and
        earlier messages once counted), the rest concurrently. Without a miss there is no task
        and no trip through the event loop, which under a burst of requests is a lap behind
        everyone else's work."""
        known = [self._tokenizer.known(text) if text else 0 for text in texts]
        missing = [text for text, count in zip(texts, known, strict=True) if count is None]
        if not missing:
            return [count or 0 for count in known]
        counted = iter(await asyncio.gather(*map(self._tokenizer.count, missing)))
        return [next(counted) if count is None else count for count in known]


def _trim_history(
    history: Sequence[Message], tokens: Sequence[int], *, budget: int
) -> tuple[list[Message], int]:
    """The newest whole messages within `budget` tokens (framing included), oldest first, never
    opening on an assistant reply. Returns them and the tokens they use."""
    kept: list[tuple[Message, int]] = []
    used = 0
    for message, count in zip(reversed(history), reversed(tokens), strict=True):
        cost = count + CHATML_MESSAGE_OVERHEAD
        if used + cost > budget:
            break
        kept.append((message, cost))
        used += cost
    kept.reverse()
    while kept and kept[0][0].role == "assistant":
        used -= kept.pop(0)[1]
    return [message for message, _ in kept], used
