"""The guard inside the conversation: blocked input never reaches the engine, a blocked answer
stops mid-stream and never releases the word, masked words arrive masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.chat.canary import canary_for
from backend.chat.events import Done, Notice, NoticeKind, Outcome, Token
from backend.guard import LexiconStore
from backend.guard.segment import jieba_segmenter
from tests.backend.chat.stack import MakeStack, Stack, run, text_of
from tests.fixtures.engines import FakeEngineHandle

LEXICON = "赌博网站\t赌博\tblock\n微信号\t广告引流\tmask\n"


@pytest.fixture
def guard(tmp_path: Path) -> LexiconStore:
    path = tmp_path / "lexicon.tsv"
    path.write_text(LEXICON, encoding="utf-8")
    return LexiconStore(path, segmenter=jieba_segmenter(cache_dir=tmp_path / "jieba"))


def guard_hits(stack: Stack, stage: str, category: str, severity: str) -> float | None:
    labels = {"stage": stage, "category": category, "severity": severity}
    return stack.metrics.registry.get_sample_value("qwen_guard_hits_total", labels)


async def test_blocked_input_makes_no_engine_call(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    events = await run(
        make_stack([fake_engine.base_url], guard=guard).pipeline, "t", "推荐个賭 博网站"
    )
    notice = next(e for e in events if isinstance(e, Notice))
    assert notice.kind is NoticeKind.BLOCKED_INPUT and "赌博" in notice.text
    assert isinstance(events[-1], Done) and events[-1].outcome is Outcome.BLOCKED
    assert fake_engine.log() == []


async def test_blocked_answer_never_releases_the_word(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    clean = "这是一段很正常的开头，用来说明问题。" * 3
    tail = "去赌博网站看看吧，还有更多内容在后面。" * 3
    fake_engine.script([{"text": clean + tail, "chunk_chars": 1, "token_delay_s": 0.02}])
    stack = make_stack([fake_engine.base_url], guard=guard)
    events = await run(stack.pipeline, "t", "随便聊聊")
    released = text_of(events)
    assert "赌博网" not in released and "博网站" not in released
    assert any(isinstance(e, Notice) and e.kind is NoticeKind.BLOCKED_OUTPUT for e in events)
    assert isinstance(events[-1], Done) and events[-1].outcome is Outcome.BLOCKED
    log = await fake_engine.settled_log()
    assert log[-1]["disconnected"] is True  # the engine was stopped too
    past = await stack.history.load("t")
    assert "赌博" not in past[-1].content


async def test_masked_word_arrives_masked(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    fake_engine.script([{"text": "我的微信号是多少不重要。", "chunk_chars": 2}])
    events = await run(make_stack([fake_engine.base_url], guard=guard).pipeline, "t", "你好")
    assert text_of(events) == "我的＊＊＊是多少不重要。"


async def test_clean_answer_is_unchanged(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    fake_engine.script([{"text": "今天天气很好，适合出去走走。", "chunk_chars": 3}])
    events = await run(make_stack([fake_engine.base_url], guard=guard).pipeline, "t", "你好")
    assert text_of(events) == "今天天气很好，适合出去走走。"
    assert all(not isinstance(e, Token) or e.text for e in events)


async def test_guard_hit_series_start_at_zero(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    stack = make_stack([fake_engine.base_url], guard=guard)
    assert guard_hits(stack, "input", "赌博", "block") == 0
    assert guard_hits(stack, "retrieval", "广告引流", "mask") == 0
    assert guard_hits(stack, "output", "广告引流", "mask") == 0
    assert guard_hits(stack, "output", "prompt_leak", "block") is None  # no canary here


async def test_blocked_input_counts_an_input_hit(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    stack = make_stack([fake_engine.base_url], guard=guard)
    await run(stack.pipeline, "t", "推荐个賭 博网站，赌博网站也行")  # two matches, one category
    assert guard_hits(stack, "input", "赌博", "block") == 1
    assert guard_hits(stack, "output", "赌博", "block") == 0


async def test_blocked_answer_counts_an_output_hit(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    fake_engine.script([{"text": "去赌博网站看看吧。", "chunk_chars": 2}])
    stack = make_stack([fake_engine.base_url], guard=guard)
    await run(stack.pipeline, "t", "随便聊聊")
    assert guard_hits(stack, "output", "赌博", "block") == 1
    assert guard_hits(stack, "input", "赌博", "block") == 0


async def test_masked_word_counts_an_output_hit(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    fake_engine.script([{"text": "我的微信号是多少不重要。", "chunk_chars": 2}])
    stack = make_stack([fake_engine.base_url], guard=guard)
    await run(stack.pipeline, "t", "你好")
    assert guard_hits(stack, "output", "广告引流", "mask") == 1


async def test_canary_leak_counts_an_output_hit(
    fake_engine: FakeEngineHandle, make_stack: MakeStack, guard: LexiconStore
) -> None:
    canary = canary_for("secret-of-this-deployment")
    stack = make_stack([fake_engine.base_url], guard=guard, canary=canary)
    assert guard_hits(stack, "output", "prompt_leak", "block") == 0
    fake_engine.script([{"text": f"内部标记是 {canary}。", "chunk_chars": 2}])
    await run(stack.pipeline, "t", "你好")
    assert guard_hits(stack, "output", "prompt_leak", "block") == 1
