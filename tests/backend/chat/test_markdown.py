"""The answer sanitizer: no image, no script link and no link to a host off the allow-list
survives, benign Markdown passes unchanged, and the output does not depend on how the answer was cut
into deltas."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
from pydantic import ValidationError

from backend.chat.events import Token
from backend.chat.markdown import IMAGE_REMOVED, MarkdownFilter, Removal, sanitize
from backend.config import Settings
from tests.backend.chat.stack import MakeStack, run, text_of
from tests.fixtures.engines import FakeEngineHandle

ALLOWED = (".example.com", "e.com")  # the hosts of the benign answers' links
WJ = "\u2060"  # word joiner: GFM makes no link across it

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
        f"![a][r]\n\n\\[r]: http:{WJ}//203.0.113.7/r.png",  # the URL left as text is no link
    ),
    "shortcut image": (
        "![r]\n\n> [r]: http://203.0.113.7/r.png",
        f"![r]\n\n> \\[r]: http:{WJ}//203.0.113.7/r.png",
    ),
    "image after later link": ("好![1] 见 [x](https://e.com)", "好\\![1] 见 [x](https://e.com)"),
    "autolink made by a removal": ('<javascript:![x](u "t")>', "<javascript: x>"),
    # links to hosts off the allow-list (ALLOWED: example.com with its subdomains, e.com)
    "link to another host": ("[点我](https://evil.com/x)", "点我"),
    "plain http": ("[a](http://evil.com)", "a"),
    "allowed name as user info": ("[a](https://example.com@evil.com)", "a"),
    "escaped at sign": ("[a](https://example.com\\@evil.com)", "a"),
    "backslash before at sign": ("[a](https://example.com\\\\@evil.com)", "a"),
    "at sign in the fragment": ("[a](https://evil.com#@example.com)", "a"),
    "allowed name as subdomain": ("[a](https://example.com.evil.com)", "a"),
    "allowed name as suffix": ("[a](https://notexample.com)", "a"),
    "protocol-relative": ("[a](//evil.com/x)", "a"),
    "slash and backslash": ("[a](/\\\\evil.com)", "a"),
    "scheme without slashes": ("[a](https:evil.com)", "a"),
    "backslashes for slashes": ("[a](https:\\\\\\\\evil.com)", "a"),
    "tab and newline in the scheme": (
        "[a](<ht\ttps://evil.com>) [b](&#10;https://evil.com)",
        "a b",
    ),
    "upper case host": ("[a](HTTPS://EVIL.COM)", "a"),
    "encoded host": ("[a](https://&#101;vil.com)", "a"),
    "percent-encoded host": ("[a](https://example%2Ecom)", "a"),  # never matched: no decoding
    "host a removal could change": ("[a](https://example.com![x](y).evil.com)", "a"),
    "autolink to another host": ("<https://evil.com/x>", f"\\<https:{WJ}//evil.com/x>"),
    "autolink with user info": (
        "<https://example.com\\@evil.com>",
        "\\<https://example.com/\\@evil.com>",  # as text, the allowed host is closed with `/`
    ),
    "bare URL": ("见 https://evil.com/x 。", f"见 https:{WJ}//evil.com/x 。"),
    "bare www": ("或 www.evil.com/x", f"或 www{WJ}.evil.com/x"),
    "bare URL with www": ("https://www.evil.com", f"https:{WJ}//www{WJ}.evil.com"),
    "bare URL, escaped": (
        "https\\://evil.com www\\.evil.com",
        f"https\\:{WJ}//evil.com www{WJ}\\.evil.com",
    ),
    "bare URL, references": ("h&#116;tps:&#47;/evil.com", f"h&#116;tps:{WJ}&#47;/evil.com"),
    "bare URL, upper case": ("HTTPS://EVIL.COM", f"HTTPS:{WJ}//EVIL.COM"),
    "bare URL after a letter": ("xhttps://evil.com", f"xhttps:{WJ}//evil.com"),
    "bare URL with user info": ("https://example.com@evil.com", "https://example.com/@evil.com"),
    "bare URL through a subdomain": (
        "https://example.com.evil.com",
        f"https:{WJ}//example.com.evil.com",
    ),
    "bare URL in link text": ("[https://evil.com](javascript:x)", f"https:{WJ}//evil.com"),
    "bare URL in alt text": ("![www.evil.com](http://e/p.png)", f"www{WJ}.evil.com"),
    "link followed by text": ("[a](https://evil.com)x", "ax"),
    "bare URL, host ended by a reference": (
        "https://example.com&sol;@evil.com",  # GFM's parser takes this URL as written
        "https://example.com/&sol;@evil.com",
    ),
    "slash made by a removal": (
        "https:&#4[7;](javascript:x)/evil.com",
        f"https:&#4{WJ}7;/evil.com",
    ),
}

BENIGN = {
    "text": "你好！今天天气不错。Hello! [1] a[0] x < y > z",
    "citations": "午休 12:30 开始[1][2]。Great![3]",
    "links": "见 [文档](https://example.com/a_(b)?q=1#x)、[邮件](mailto:a@b.c)、[上级](../x)、<https://example.com/>、www.example.com",
    "allowed hosts": "[a](https://docs.example.com/x) [b](HTTPS://Example.COM.:8443/y) https://e.com/a?b=1, www.example.com. (http://e.com)",
    "same origin": "[a](/chat/x) [b](#top) [c](?q=1) [d](x/y.html)",
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
    assert sanitize(text, link_hosts=ALLOWED) == expected


@pytest.mark.parametrize("text", BENIGN.values(), ids=BENIGN.keys())
def test_benign_markdown_passes_unchanged(text: str) -> None:
    f = MarkdownFilter(link_hosts=ALLOWED)
    assert stream(f, [text]) == text
    assert not f.removed


@pytest.mark.parametrize("text", [t for t, _ in HOSTILE.values()] + list(BENIGN.values()))
@pytest.mark.parametrize("hosts", [(), ALLOWED], ids=["no hosts", "allowed hosts"])
def test_every_cut_gives_the_same_output(text: str, hosts: tuple[str, ...]) -> None:
    whole = sanitize(text, link_hosts=hosts)
    for cut in range(len(text) + 1):
        assert stream(MarkdownFilter(link_hosts=hosts), [text[:cut], text[cut:]]) == whole, cut
    assert stream(MarkdownFilter(link_hosts=hosts), list(text)) == whole


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


@pytest.mark.parametrize("seed", range(5))
def test_random_cuts_of_urls_agree(seed: int) -> None:
    rng = random.Random(seed)
    pieces = ["https:", "//", "/", "\\/", "&#47;", ".", "www", "example.com", "evil.com", "@", "#",
              ":80", ")", "中", " ", "\n", "[", "](", "<", ">", "&", "&#4", "7;", "\\", "!["]  # fmt: skip
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        whole = stream(MarkdownFilter(max_hold=64, link_hosts=ALLOWED), [text])
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 6)))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        filtered = MarkdownFilter(max_hold=64, link_hosts=ALLOWED)
        assert stream(filtered, deltas) == whole, text


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
    assert sanitize("x\r[r]: http://e/p.png", link_hosts=["e"]) == "x\n\\[r]: http://e/p.png"


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


def test_without_hosts_no_http_link_survives() -> None:
    f = MarkdownFilter()
    text = (
        "[a](https://example.com/x) <https://example.com> www.example.com [m](mailto:a@b.c) [r](/x)"
    )
    assert stream(f, [text]) == (
        f"a \\<https:{WJ}//example.com> www{WJ}.example.com [m](mailto:a@b.c) [r](/x)"
    )
    assert f.removed == {Removal.LINK: 3}


@pytest.mark.parametrize(
    ("hosts", "host", "allowed"),
    [
        (["example.com"], "example.com", True), (["example.com"], "docs.example.com", False),
        ([".example.com"], "example.com", True), ([".example.com"], "docs.example.com", True),
        ([".example.com"], "a.b.example.com", True), ([".example.com"], "notexample.com", False),
        ([".example.com"], "example.com.evil.com", False), (["Example.COM."], "EXAMPLE.com", True),
        (["203.0.113.7"], "203.0.113.7", True), (["203.0.113.7"], "203.0.113.70", False),
    ],
)  # fmt: skip
def test_subdomains_only_with_a_leading_dot(hosts: list[str], host: str, allowed: bool) -> None:
    link, bare = f"[a](https://{host}/x)", f"see https://{host}/x"
    assert (sanitize(link, link_hosts=hosts) == link) is allowed
    assert (sanitize(bare, link_hosts=hosts) == bare) is allowed


def test_a_link_off_the_list_is_cut_the_same_at_every_boundary() -> None:
    text = "先看[点我](https://evil.com/x?a=1)，再看 https://evil.com/y 与 www.evil.com。"
    expected = f"先看点我，再看 https:{WJ}//evil.com/y 与 www{WJ}.evil.com。"
    assert sanitize(text, link_hosts=ALLOWED) == expected
    for cut in range(len(text) + 1):
        f = MarkdownFilter(link_hosts=ALLOWED)
        assert stream(f, [text[:cut], text[cut:]]) == expected, cut
        assert f.removed == {Removal.LINK: 3}, cut
    assert stream(MarkdownFilter(link_hosts=ALLOWED), list(text)) == expected


def test_each_link_off_the_list_is_counted_once() -> None:
    for text in ["<https://evil.com>", "https://www.evil.com", "[https://evil.com](https://evil.com)",
                 "[a](https://evil.com)https://evil.com", "![https://evil.com](http://e/p.png)"]:  # fmt: skip
        f = MarkdownFilter(link_hosts=ALLOWED)
        stream(f, [text])
        assert f.removed[Removal.LINK] == 1, text
    f = MarkdownFilter(link_hosts=ALLOWED)
    stream(f, ["https://evil.com https://evil.com\nwww.evil.com [a](//evil.com)"])
    assert f.removed == {Removal.LINK: 4}


def test_an_allowed_host_followed_by_text_is_closed_with_a_slash() -> None:
    """GFM reads `https://example.com)中文` as one URL, its host `example.com)中文`; a `/` after
    the host keeps the link (in a destination, the same URL) where the reader expects it."""
    cases = {
        "详见[文档](https://example.com)。然后": "详见[文档](https://example.com/)。然后",
        "见 https://docs.example.com，详情": "见 https://docs.example.com/，详情",
        "<https://example.com>、": "<https://example.com/>、",
        "https://example.com:8443@evil.com": "https://example.com:8443/@evil.com",
        "https://e.com~_": "https://e.com/~_",  # GFM keeps `~` and `_` in the host
        "https://example.com), and https://example.com.": "https://example.com), and https://example.com.",
    }  # fmt: skip
    for text, expected in cases.items():
        f = MarkdownFilter(link_hosts=ALLOWED)
        assert stream(f, list(text)) == expected, text
        assert not f.removed, text


def test_a_url_inside_an_allowed_link_is_judged_too() -> None:
    text = "[a](https://example.com/login?next=https://evil.com/x)"
    expected = f"[a](https://example.com/login?next=https:{WJ}//evil.com/x)"  # the link stays
    assert sanitize(text, link_hosts=ALLOWED) == expected


def test_hold_back_for_a_bare_url_is_bounded() -> None:
    f = MarkdownFilter(max_hold=64, link_hosts=ALLOWED)
    released = "".join(f.feed(c) for c in "https://" + "a" * 200)
    assert f.holding < 64 and released.startswith(f"https:{WJ}//")  # undecided: defused
    assert f.removed == {Removal.LINK: 1}


def test_malformed_hosts_are_refused() -> None:
    for entry in ["https://example.com", "example.com/x", "example.com:443", "*.example.com", ""]:
        with pytest.raises(ValueError, match="link host"):
            MarkdownFilter(link_hosts=[entry])


def test_hosts_come_from_the_guard_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("QWEN_") and not n.startswith("QWEN_TEST_")]:
        monkeypatch.delenv(name)
    assert Settings().guard.link_hosts == []
    monkeypatch.setenv("QWEN_GUARD__LINK_HOSTS", '["Docs.Example.COM.", ".corp.example"]')
    assert Settings().guard.link_hosts == ["docs.example.com", ".corp.example"]
    monkeypatch.setenv("QWEN_GUARD__LINK_HOSTS", '["https://docs.example.com"]')
    with pytest.raises(ValidationError, match="link host"):
        Settings()


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


async def test_pipeline_links_only_to_its_hosts(
    fake_engine: FakeEngineHandle, make_stack: MakeStack
) -> None:
    answer = "见 [文档](https://docs.example.com/a) 与 [别处](https://evil.com/b)，或 https://evil.com/c。"
    fake_engine.script([{"text": answer, "chunk_chars": 3}])
    stack = make_stack([fake_engine.base_url])
    config = stack.pipeline._config  # the settings' guard.link_hosts arrive through PipelineConfig
    stack.pipeline._config = dataclasses.replace(config, link_hosts=(".example.com",))
    events = await run(stack.pipeline, "t", "你好")
    expected = f"见 [文档](https://docs.example.com/a) 与 别处，或 https:{WJ}//evil.com/c。"
    assert text_of(events) == expected
    assert (await stack.history.load("t"))[-1].content == expected
    assert 'qwen_answer_sanitized_total{kind="link"} 2.0' in stack.metrics.render().decode()
