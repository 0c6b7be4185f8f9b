"""The shaping table with a one-token-per-character tokenizer, and one shaped request against the
real llama.cpp server's tokenizer and context window."""

from __future__ import annotations

import itertools
import re

import httpx
import pytest

from backend.chat.sentiment import probe_request
from backend.chat.shaping import (
    DEFAULT_POLICY,
    TASKS,
    Priority,
    Shaped,
    Shaper,
    Task,
    Tier,
    detect_task,
    render_table,
    retrieval_top_k,
)
from backend.errors import ConfigError
from backend.serving.engine import Message
from backend.serving.tokenizer import EngineTokenizer, count_messages

WINDOW = 4096
MAX_TOKENS = 512
SYSTEM = "你是测试助手。"
ANSWERING = (Tier.NORMAL, Tier.REDUCED, Tier.BRIEF)

EXAMPLES = {
    Task.CHAT: "你好，今天心情不错",
    Task.QA: "天空为什么是蓝色的？",
    Task.SUMMARY: "帮我总结一下这段会议记录",
    Task.TRANSLATION: "把这句话翻译成英文",
    Task.CREATIVE: "写一首关于春天的诗",
    Task.CLASSIFICATION: "判断这条评论的情感",
}
TEMPERATURE = {  # (lowest, highest) allowed
    Task.CHAT: (0.5, 0.8),
    Task.QA: (0.1, 0.3),
    Task.SUMMARY: (0.1, 0.3),
    Task.TRANSLATION: (0.1, 0.3),
    Task.CREATIVE: (0.8, 1.0),
    Task.CLASSIFICATION: (0.05, 0.2),
}
MAX_ANSWER = {Tier.NORMAL: MAX_TOKENS, Tier.REDUCED: MAX_TOKENS // 2, Tier.BRIEF: 64}


class CharTokenizer:
    """One token per character, always known at once (as cached counts are)."""

    async def count(self, text: str) -> int:
        return len(text)

    def known(self, text: str) -> int:
        return len(text)


class WordTokenizer:
    """One token per space-separated word: far fewer tokens than characters. Never known at
    once, so every count is asked for (as a cold engine tokenizer's are)."""

    async def count(self, text: str) -> int:
        return len(text.split())

    def known(self, text: str) -> None:
        return None


def _shaper(*, window: int = WINDOW, max_tokens: int = MAX_TOKENS) -> Shaper:
    return Shaper(tokenizer=CharTokenizer(), context_window=window, max_tokens=max_tokens)


async def _shape(text: str, *, window: int = WINDOW, history: tuple[Message, ...] = (),
                 **options: object) -> Shaped:  # fmt: skip
    shaper = _shaper(window=window)
    return await shaper.shape(text, history=history, system_prompt=SYSTEM, **options)  # type: ignore[arg-type]


def _turns(count: int, *, size: int) -> tuple[Message, ...]:
    """`count` alternating user/assistant messages of `size` characters, oldest first."""
    roles = itertools.cycle(("user", "assistant"))
    return tuple(Message(next(roles), f"{i:03d}" + "话" * (size - 3)) for i in range(count))


@pytest.mark.parametrize(("task", "text"), list(EXAMPLES.items()))
def test_detects_task(task: Task, text: str) -> None:
    assert detect_task(text) is task


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("Please summarize this article", Task.SUMMARY),
        ("Translate 'hello' into Chinese", Task.TRANSLATION),
        ("Write a poem about autumn", Task.CREATIVE),
        ("Classify these reviews", Task.CLASSIFICATION),
        ("How does HNSW work", Task.QA),
        ("总结一下这是什么？", Task.SUMMARY),
        ("这个故事讲的是什么？", Task.QA),
        ("Show me the logs", Task.CHAT),
    ],
)
def test_detection_rules_in_order(text: str, task: Task) -> None:
    assert detect_task(text) is task


@pytest.mark.parametrize(("task", "tier"), list(itertools.product(Task, ANSWERING)))
async def test_table_temperature(task: Task, tier: Tier) -> None:
    low, high = TEMPERATURE[task]
    assert low <= (await _shape(EXAMPLES[task], tier=tier)).request.temperature <= high


@pytest.mark.parametrize(("task", "tier"), list(itertools.product(Task, ANSWERING)))
async def test_table_max_tokens(task: Task, tier: Tier) -> None:
    assert 1 <= (await _shape(EXAMPLES[task], tier=tier)).request.max_tokens <= MAX_ANSWER[tier]


@pytest.mark.parametrize("task", list(Task))
def test_no_task_samples_at_zero(task: Task) -> None:
    assert TASKS[task].temperature > 0


def test_probe_samples_above_zero() -> None:
    assert probe_request("好").temperature > 0


@pytest.mark.parametrize("task", list(Task))
async def test_task_reported(task: Task) -> None:
    assert (await _shape(EXAMPLES[task])).task is task


@pytest.mark.parametrize(
    ("window", "chars", "turns"),
    [(512, 10, 0), (512, 3000, 0), (1024, 50, 40), (4096, 9000, 12), (300, 200, 6)],
)
async def test_max_tokens_within_window(window: int, chars: int, turns: int) -> None:
    shaped = await _shape("问" * chars, window=window, history=_turns(turns, size=120))
    assert shaped.request.max_tokens <= window - shaped.prompt_tokens - DEFAULT_POLICY.margin_tokens


async def test_prompt_tokens_count_the_request() -> None:
    shaped = await _shape("你好" * 50, history=_turns(6, size=80), context="资料" * 30)
    assert shaped.prompt_tokens == await count_messages(CharTokenizer(), shaped.request.messages)


async def test_max_tokens_capped_by_settings() -> None:
    shaper = _shaper(max_tokens=100)
    shaped = await shaper.shape("你好", history=(), system_prompt=SYSTEM)
    assert shaped.request.max_tokens == 100


async def test_short_prompt_streams() -> None:
    assert (await _shape("你好")).stream is True


async def test_long_prompt_does_not_stream() -> None:
    assert (await _shape("长" * 1000)).stream is False


async def test_override_streams_long_prompt() -> None:
    shaped = await _shape("长" * 1000, stream_override=True)
    assert (shaped.stream, shaped.request.stream) == (True, True)


async def test_override_stops_streaming_short_prompt() -> None:
    shaped = await _shape("你好", stream_override=False)
    assert (shaped.stream, shaped.request.stream) == (False, False)


def test_priorities_ordered() -> None:
    assert Priority.PROBE < Priority.INTERACTIVE < Priority.LONG


async def test_short_prompt_is_interactive() -> None:
    assert (await _shape("你好")).request.priority == Priority.INTERACTIVE


async def test_long_prompt_is_long() -> None:
    assert (await _shape("长" * 1000)).request.priority == Priority.LONG


def test_probe_runs_first() -> None:
    assert probe_request("好").priority == Priority.PROBE


async def test_condenses_over_long_input() -> None:
    assert (await _shape("长" * 5000, window=1024)).condensed is True


async def test_short_input_not_condensed() -> None:
    assert (await _shape("你好", window=1024)).condensed is False


async def test_condensed_keeps_head_and_tail() -> None:
    text = "头" * 2000 + "腰" * 2000 + "尾" * 2000
    content = (await _shape(text, window=1024)).request.messages[-1].content
    assert (content[0], content[-1], "腰" in content) == ("头", "尾", False)


async def test_condensed_marks_the_cut() -> None:
    text = "甲" * 5000
    content = (await _shape(text, window=1024)).request.messages[-1].content
    omitted = int(re.search(r"中间省略 (\d+) 字", content).group(1))  # type: ignore[union-attr]
    assert omitted == 5000 - content.count("甲")


async def test_history_trimmed_to_budget() -> None:
    shaped = await _shape("你好", window=1024, history=_turns(40, size=100))
    assert (shaped.history_kept, shaped.history_dropped) == (4, 36)


async def test_history_keeps_newest() -> None:
    history = _turns(40, size=100)
    shaped = await _shape("你好", window=1024, history=history)
    assert shaped.request.messages[-2] == history[-1]


async def test_history_never_opens_on_assistant() -> None:
    shaped = await _shape("你好", window=1024, history=_turns(41, size=100))
    assert shaped.request.messages[1].role == "user"


async def test_history_trimmed_by_tokens_not_characters() -> None:
    history = tuple(Message(role, "word " * 200) for role in ("user", "assistant") * 5)
    shaper = Shaper(tokenizer=WordTokenizer(), context_window=1024, max_tokens=MAX_TOKENS)
    shaped = await shaper.shape("hello", history=history, system_prompt=SYSTEM)
    assert shaped.history_kept == 2  # 10 × 1000 characters, but 200 tokens each


class HalfKnownTokenizer(CharTokenizer):
    """Knows the counts of assistant-looking texts only; every other count is asked for."""

    def known(self, text: str) -> int | None:  # type: ignore[override]
        return len(text) if text.startswith("答") else None


async def test_counts_known_and_asked_for_land_in_place() -> None:
    history = tuple(Message(role, f"{'问' if role == 'user' else '答'}" * size)
                    for role, size in (("user", 300), ("assistant", 500), ("user", 200),
                                       ("assistant", 700)))  # fmt: skip
    window = 1024 + MAX_TOKENS  # room for the last two messages, not for all four
    expected = await _shape("你好", window=window, history=history)
    mixed = Shaper(tokenizer=HalfKnownTokenizer(), context_window=window, max_tokens=MAX_TOKENS)
    shaped = await mixed.shape("你好", history=history, system_prompt=SYSTEM)
    assert (shaped.prompt_tokens, shaped.history_kept) == (
        expected.prompt_tokens, expected.history_kept)  # fmt: skip
    assert shaped.history_kept == 2


async def test_brief_asks_for_one_sentence() -> None:
    system = (await _shape("你好", tier=Tier.BRIEF)).request.messages[0].content
    assert system.startswith(SYSTEM) and "一句话" in system


async def test_brief_stops_at_blank_line() -> None:
    assert "\n\n" in (await _shape("你好", tier=Tier.BRIEF)).request.stop


async def test_busy_makes_no_request() -> None:
    with pytest.raises(ValueError, match="busy"):
        await _shape("你好", tier=Tier.BUSY)


async def test_system_prompt_too_long_for_window() -> None:
    with pytest.raises(ConfigError):
        await _shaper(window=200).shape("你好", history=(), system_prompt="长" * 200)


async def test_sources_fenced_in_user_turn() -> None:
    content = (await _shape("问题", context="资料内容")).request.messages[-1].content
    assert "<sources>\n资料内容\n</sources>" in content and content.endswith("问题")


async def test_sources_cut_to_their_share() -> None:
    shaped = await _shape("问题", window=1024, context="资" * 3000)
    assert shaped.context_truncated and shaped.request.messages[-1].content.count("资") < 1000


async def test_sources_reduced_under_load() -> None:
    normal = await _shape("问题", window=2048, context="资" * 3000)
    reduced = await _shape("问题", window=2048, context="资" * 3000, tier=Tier.REDUCED)
    assert reduced.prompt_tokens < normal.prompt_tokens


def test_retrieval_halved_when_reduced() -> None:
    assert retrieval_top_k(Tier.REDUCED, top_k=8) == 4


def test_no_retrieval_when_busy() -> None:
    assert retrieval_top_k(Tier.BUSY, top_k=8) == 0


def test_table_renders_every_answering_cell() -> None:
    table = render_table(max_tokens=MAX_TOKENS, context_window=WINDOW)
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == len(Task) * len(ANSWERING) and "BUSY" not in table


@pytest.mark.slow
async def test_real_engine_accepts_shaped_request(llama_server: str) -> None:
    tokenizer = EngineTokenizer(llama_server)
    try:
        shaper = Shaper(tokenizer=tokenizer, context_window=512, max_tokens=MAX_TOKENS)
        history = tuple(Message(m.role, m.content * 3) for m in _turns(8, size=40))
        shaped = await shaper.shape("请总结：" + "天气晴朗，适合出游。" * 200, history=history,
                                    system_prompt=SYSTEM)  # fmt: skip
    finally:
        await tokenizer.aclose()
    body = {
        "messages": [{"role": m.role, "content": m.content} for m in shaped.request.messages],
        "max_tokens": shaped.request.max_tokens,
    }
    async with httpx.AsyncClient(trust_env=False, timeout=120) as client:
        reply = await client.post(f"{llama_server}/chat/completions", json=body)
    used = reply.json()["usage"]["prompt_tokens"]
    assert (shaped.condensed, used + shaped.request.max_tokens <= 512) == (True, True)
