"""The answer sanitizer: no image and no script link survives, benign Markdown passes unchanged,
and the output does not depend on how the answer was cut into deltas."""

from __future__ import annotations

import random

import pytest

from backend.chat.events import Token
from backend.chat.markdown import IMAGE_REMOVED, MarkdownFilter, Removal, sanitize
from tests.backend.chat.stack import MakeStack, run, text_of
from tests.fixtures.engines import FakeEngineHandle

HOSTILE = {
    "image": ("看 ![x](http://203.0.113.7/track.png) 这里", "看 x 这里"),
    "image without alt": ("![](http://203.0.113.7/t.png)", "\\[图片已移除\\]"),
    "image with title": ('![图](http://203.0.113.7/t.png "标题")。', "图。"),
    "image in angle brackets": ("![a](<http://203.0.113.7/a b.png>)", "a"),
    "image over two lines": ("![a\nb](\nhttp://203.0.113.7/t.png\n)", "a\nb"),
    "video": ("![v](http://203.0.113.7/v.mp4)", "v"),
    "image alt with markup": (
        "![a [b](javascript:x)](http://e/t.png)",
        "a \\[b\\]\\(javascript:x\\)",
    ),
    "image in a link": (
        "[![badge](http://e/b.png)](https://example.com)",
        "[badge](https://example.com)",
    ),
    "javascript link": ("[点我](javascript:window.__pwned=3)", "点我"),
    "upper case scheme": ("[a](JavaScript:alert(1))", "a"),
    "encoded scheme": ("[a](java&#115;cript:x)", "a"),
    "named reference": ("[a](javascript&colon;x)", "a"),
    "escaped colon": ("[a](javascript\\:x)", "a"),
    "leading blank": ("[a](&#32;javascript:x)", "a"),
    "tab in scheme": ("[a](<java\tscript:x>)", "a"),
    "data link": ("[a](data:text/html,<b>x</b>)", "a"),
    "vbscript link": ("[a](vbscript:msgbox)", "a"),
    "file link": ("[a](file:///etc/passwd)", "a"),
    "link without text": ("[](javascript:x)", "\\[链接已移除\\]"),
    "link with code text": ("[a`]`](javascript:x)", "[a`]`]\\(javascript:x)"),
    "autolink": ("<javascript:alert(1)>", "\\<javascript:alert(1)>"),
    "reference image": (
        "![a][r]\n\n[r]: http://203.0.113.7/r.png",
        "![a][r]\n\n\\[r]: http://203.0.113.7/r.png",
    ),
    "shortcut image": (
        "![r]\n\n> [r]: http://203.0.113.7/r.png",
        "![r]\n\n> \\[r]: http://203.0.113.7/r.png",
    ),
    "image after later link": ("好![1] 见 [x](https://e.com)", "好\\![1] 见 [x](https://e.com)"),
    "autolink made by a removal": ('<javascript:![x](u "t")>', "<javascript: x>"),
}

BENIGN = {
    "text": "你好！今天天气不错。Hello! [1] a[0] x < y > z",
    "citations": "午休 12:30 开始[1][2]。Great![3]",
    "links": "见 [文档](https://example.com/a_(b)?q=1#x)、[邮件](mailto:a@b.c)、[上级](../x)、<https://example.com>、www.example.com",
    "list": "- 第一\n- [ ] 待办\n- [x] 已办\n\n1. 一\n2. 二",
    "table": "| 名称 | 值 |\n|---|---|\n| a[0] | [链接](https://e.com) |",
    "quote": "> 引用 *强调* **加粗** ~~删除~~\n\n---\n\n# 标题",
    "inline code": '用 `vec![1, 2]`、`List<String>`、`a[i]` 和 `map!["a"]`',
    "code block": '```rust\nlet v = vec![1](x:y);\nlet m = map!["a"];\n<xs:sequence>\n[r]: x\n![i](http://e/p.png)\n```\n后文',
    "tilde block": "~~~\n![i](http://e/p.png)\n~~~",
    "footnote": "正文[^1]。\n\n[^1]: 注释",
    "html": '<script>window.__pwned=1</script> <img src=x onerror="alert(1)">',
    "escapes": "\\![a](b) \\[c\\] 1\\*2",
}


def stream(f: MarkdownFilter, deltas: list[str]) -> str:
    return "".join(f.feed(d) for d in deltas) + f.finish()


@pytest.mark.parametrize(("text", "expected"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_markdown_is_rewritten(text: str, expected: str) -> None:
    assert sanitize(text) == expected


@pytest.mark.parametrize("text", BENIGN.values(), ids=BENIGN.keys())
def test_benign_markdown_passes_unchanged(text: str) -> None:
    f = MarkdownFilter()
    assert stream(f, [text]) == text
    assert not f.removed


@pytest.mark.parametrize("text", [t for t, _ in HOSTILE.values()] + list(BENIGN.values()))
def test_every_cut_gives_the_same_output(text: str) -> None:
    whole = sanitize(text)
    for cut in range(len(text) + 1):
        assert stream(MarkdownFilter(), [text[:cut], text[cut:]]) == whole, cut
    assert stream(MarkdownFilter(), list(text)) == whole


@pytest.mark.parametrize("seed", range(5))
def test_random_cuts_with_a_short_window_agree(seed: int) -> None:
    rng = random.Random(seed)
    pieces = ["![", "](", "[", "]", "(", ")", "<", ">", "\\", "\n", "\n\n", "!", "`", "```", ":",
              "javascript:", "http://e/p.png", "a", "字", "x" * 40, '"t"', "> ", "- ", "\r\n"]  # fmt: skip
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        whole = stream(MarkdownFilter(max_hold=64), [text])
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 6)))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(MarkdownFilter(max_hold=64), deltas) == whole, text


def test_plain_text_is_not_held() -> None:
    f = MarkdownFilter()
    assert f.feed("第一段文字，") == "第一段文字，"
    assert f.holding == 0


def test_unfinished_image_is_held_until_decided() -> None:
    f = MarkdownFilter()
    out = [f.feed(d) for d in ["看 !", "[x", "](http://203.0.113.7/t", ".png) 完"]]
    assert out == ["看 ", "", "", "x 完"]


def test_trailing_bang_waits_for_the_next_character() -> None:
    f = MarkdownFilter()
    assert f.feed("好!") == "好"
    assert f.feed("!") == "!"
    assert f.finish() == "!"


def test_hold_back_is_bounded() -> None:
    f = MarkdownFilter(max_hold=64)
    released = "".join(f.feed(c) for c in "![" + "长" * 200)
    assert f.holding < 64 and released
    assert (released + f.finish()).startswith("\\![")  # undecided after 64 characters: defused


def test_undecided_image_at_the_window_is_defused() -> None:
    alt = "a" * 100
    assert stream(MarkdownFilter(max_hold=64), [f"![{alt}](http://e/p.png)"]).startswith("\\![")


def test_unclosed_bracket_at_the_end_is_kept() -> None:
    assert sanitize("数组 a[") == "数组 a["


def test_line_endings_are_normalised() -> None:
    f = MarkdownFilter()
    assert stream(f, ["a\r", "\nb\rc"]) == "a\nb\nc"


def test_definition_after_carriage_return_is_escaped() -> None:
    assert sanitize("x\r[r]: http://e/p.png") == "x\n\\[r]: http://e/p.png"


def test_fence_inside_html_block_is_not_trusted() -> None:
    text = "<div>\n```\n\n![x](http://e/p.png)"
    assert sanitize(text) == "<div>\n```\n\nx"


def test_directive_end_closes_a_fence() -> None:
    text = ":::note\n```\n:::\n![x](http://e/p.png)"
    assert sanitize(text) == ":::note\n```\n:::\nx"


def test_removals_are_counted_by_kind() -> None:
    f = MarkdownFilter()
    stream(f, ["![a](http://e/1.png) ![b](http://e/2.png) [c](javascript:x)\n[r]: /x"])
    assert f.removed == {Removal.IMAGE: 2, Removal.LINK: 1, Removal.DEFINITION: 1}


def test_short_window_is_refused() -> None:
    with pytest.raises(ValueError, match="max_hold"):
        MarkdownFilter(max_hold=8)


def test_placeholder_is_the_documented_one() -> None:
    assert sanitize("![ ](http://e/p.png)") == IMAGE_REMOVED.replace("[", "\\[").replace("]", "\\]")


async def test_pipeline_sanitizes_the_answer(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    answer = "结果如下 ![图](http://203.0.113.7/t.png) 与 [点我](javascript:alert(1))。"
    fake_engine.script([{"text": answer, "chunk_chars": 3}])
    stack = make_stack([fake_engine.base_url])
    events = await run(stack.pipeline, "t", "你好")
    assert text_of(events) == "结果如下 图 与 点我。"
    assert all(not isinstance(e, Token) or e.text for e in events)
    assert (await stack.history.load("t"))[-1].content == "结果如下 图 与 点我。"
    metrics = stack.metrics.render().decode()
    assert 'qwen_answer_sanitized_total{kind="image"} 1.0' in metrics
    assert 'qwen_answer_sanitized_total{kind="link"} 1.0' in metrics
