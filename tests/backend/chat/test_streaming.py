from collections.abc import AsyncGenerator

import pytest

from backend.chat.streaming import Shown, screened
from backend.guard import Lexicon, Matcher, StreamGuard, builtin_lexicon_dir, jieba_segmenter


@pytest.fixture(scope="module")
def matcher(tmp_path_factory: pytest.TempPathFactory) -> Matcher:
    segmenter = jieba_segmenter(cache_dir=tmp_path_factory.mktemp("jieba"))
    return Matcher(Lexicon.load(builtin_lexicon_dir()), segmenter=segmenter)


async def _deltas(*texts: str) -> AsyncGenerator[str, None]:
    for text in texts:
        yield text


async def _shown(matcher: Matcher, *texts: str) -> list[Shown]:
    ticks = iter(range(100))
    guard = StreamGuard(matcher, batch_chars=1)
    return [piece async for piece in screened(_deltas(*texts), guard, clock=lambda: next(ticks))]


async def test_held_text_keeps_the_time_it_arrived(matcher: Matcher) -> None:
    # 一 may begin 一夜情: held until 面 decides it, then shown with its own arrival
    pieces = await _shown(matcher, "三面环山，", "一", "面临城")
    assert [(p.text, p.arrived) for p in pieces] == [("三面环山，", 0), ("一", 1), ("面临城", 2)]


async def test_a_block_ends_with_the_verdict(matcher: Matcher) -> None:
    pieces = await _shown(matcher, "可以", "加微", "信聊")
    assert "".join(p.text for p in pieces) == "可以"
    assert pieces[-1].blocked is not None


async def test_without_a_guard_deltas_pass_with_their_times() -> None:
    ticks = iter(range(100))
    pieces = [p async for p in screened(_deltas("你", "好"), None, clock=lambda: next(ticks))]
    assert [(p.text, p.arrived) for p in pieces] == [("你", 0), ("好", 1)]
