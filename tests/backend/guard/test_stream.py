"""The stream filter: a blocked word never reaches the client, however the answer is split."""

from __future__ import annotations

import random

import pytest

from backend.guard import MAX_GAP, Matcher, Release, StreamGuard, Verdict

STRETCHED = ("-" * MAX_GAP).join("代开发票")  # a block word at its longest original span
BLOCKED = [
    ("好的，我来回答。请加微【】信abc123联系我们，谢谢。", "加"),
    (f"好的，我来回答。可以{STRETCHED}，谢谢。", "代"),
]


def _stream(
    matcher: Matcher, pieces: list[str], *, batch_chars: int = 1
) -> tuple[str, Verdict | None]:
    guard = StreamGuard(matcher, batch_chars=batch_chars)
    shown, blocked = [], None
    for piece in pieces:
        release = guard.feed(piece)
        shown.append(release.text)
        blocked = blocked or release.blocked
        if blocked:
            return "".join(shown), blocked
    release = guard.finish()
    return "".join(shown) + release.text, blocked or release.blocked


def _splits(text: str) -> list[list[str]]:
    """Every two-piece split, single characters, and seeded random chunkings."""
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    splits.append(list(text))
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 2)))
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return splits


@pytest.mark.parametrize("batch_chars", [1, 8])
@pytest.mark.parametrize(("text", "first_letter"), BLOCKED)
def test_blocked_word_never_released(
    matcher: Matcher, text: str, first_letter: str, batch_chars: int
) -> None:
    for pieces in _splits(text):
        shown, blocked = _stream(matcher, pieces, batch_chars=batch_chars)
        assert blocked is not None and blocked.blocked
        assert text.startswith(shown) and len(shown) <= text.index(first_letter), pieces


@pytest.mark.parametrize("batch_chars", [1, 8])
def test_masked_word_released_masked(matcher: Matcher, batch_chars: int) -> None:
    text = "你好，联系ＶＸ：abc，还有一【】夜情的说法，以及 v x 号。"
    for pieces in _splits(text):
        assert _stream(matcher, pieces, batch_chars=batch_chars) == (matcher.mask(text), None)


@pytest.mark.parametrize("gap", ["", "-" * MAX_GAP])
def test_allow_list_decided_across_chunks(matcher: Matcher, gap: str) -> None:
    text = f"请阅读《{gap.join('枪支管理法')}》的规定。"  # 枪支 is blocked, 枪支管理法 allowed
    for pieces in _splits(text):
        assert _stream(matcher, pieces) == (text, None), pieces


def test_allowed_prefix_then_blocked_word(matcher: Matcher) -> None:
    text = "枪支管理法之外，还在卖枪支。"
    shown, blocked = _stream(matcher, list(text))
    assert blocked is not None
    assert [hit.span for hit in blocked.hits] == [(11, 13)]
    assert len(shown) <= 11


def test_clean_answer_is_released_whole(matcher: Matcher) -> None:
    text = "今天天气很好，我们去公园散步吧。" * 3
    assert _stream(matcher, list(text), batch_chars=8) == (text, None)


def test_nothing_released_after_block(matcher: Matcher) -> None:
    guard = StreamGuard(matcher, batch_chars=1)
    guard.feed("请加微信")
    blocked = guard.feed("。" * 40)
    assert blocked.text == "" and blocked.blocked is not None
    assert guard.feed("更多文字" * 20) == Release("", blocked.blocked)
    assert guard.finish() == Release("", blocked.blocked)


def test_stream_agrees_with_check_on_long_answer(matcher: Matcher) -> None:
    filler = "这是一段很长的普通回答，用来测试滑动窗口。" * 200  # past the track trim point
    text = filler + "还有一夜情" + filler + "最后加微信"
    shown, blocked = _stream(matcher, [text[i : i + 3] for i in range(0, len(text), 3)])
    assert blocked is not None and blocked.blocked == matcher.check(text).blocked
    assert matcher.mask(text).startswith(shown) and "＊＊＊" in shown


def test_verdict_lists_hits_acted_on(matcher: Matcher) -> None:
    guard = StreamGuard(matcher)
    guard.feed("他说一夜情。")
    guard.finish()
    assert [hit.word for hit in guard.verdict.hits] == ["一夜情"]


def test_feed_after_finish_raises(matcher: Matcher) -> None:
    guard = StreamGuard(matcher)
    guard.finish()
    with pytest.raises(RuntimeError):
        guard.feed("x")


def test_finish_twice_raises(matcher: Matcher) -> None:
    guard = StreamGuard(matcher)
    guard.finish()
    with pytest.raises(RuntimeError):
        guard.finish()


def test_clean_text_is_released_without_hold_back(matcher: Matcher) -> None:
    guard = StreamGuard(matcher, batch_chars=1)
    released = [guard.feed(ch).text for ch in "今天天气很好"]
    assert released == list("今天天气很好")  # each character as it comes: nothing could match


def test_only_a_possible_beginning_is_held(matcher: Matcher) -> None:
    guard = StreamGuard(matcher, batch_chars=1)
    assert guard.feed("说到枪").text == "说到"  # 枪 may begin 枪支: held
    assert guard.feed("法").text == "枪法"  # 枪法 begins nothing: released


def test_inserted_symbols_keep_a_beginning_held(matcher: Matcher) -> None:
    guard = StreamGuard(matcher, batch_chars=1)
    assert guard.feed("说到枪" + "-" * MAX_GAP).text == "说到"
    assert guard.feed("-").text == "枪" + "-" * (MAX_GAP + 1)  # too far apart to be one word


def test_the_first_delta_is_scanned_at_once(matcher: Matcher) -> None:
    now = [0.0]
    guard = StreamGuard(matcher, batch_chars=16, max_delay_s=0.05, clock=lambda: now[0])
    assert guard.feed("今天").text == "今天"  # nothing scanned yet: no reason to wait


def test_a_burst_is_gathered_until_time_passes(matcher: Matcher) -> None:
    now = [0.0]
    guard = StreamGuard(matcher, batch_chars=16, max_delay_s=0.05, clock=lambda: now[0])
    guard.feed("今天")
    now[0] = 0.01
    assert guard.feed("天气").text == ""  # 10 ms after the last scan, under the batch: gathered
    now[0] = 0.06
    assert guard.feed("很好").text == "天气很好"  # 50 ms since the last scan: scanned, released
