"""The CommonMark readers behind the answer filter: what they read, and that an answer, once
given, never changes as more text arrives (the filter's chunking invariance rests on it); how the
browser reads a link's host, and where GFM finds a bare URL."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from backend.chat.markdown_syntax import (
    WORD_JOINER,
    BareUrl,
    Edge,
    Fence,
    LinkHosts,
    Want,
    autolink,
    autolink_url,
    bare_url,
    closer_ahead,
    decode,
    dest_allowed,
    destination,
    fence_closes,
    fence_opens,
    host_allowed,
    inert,
    label_end,
    link_host,
    scheme_allowed,
    starts_definition,
    url_allowed,
)

PIECES = ["[", "]", "(", ")", "<", ">", "\\", "\n", "\n\n", " ", "a", "字", "`", "!", ":", '"', "'",
          "&#58;", "javascript", "http", "~", "^", "\t"]  # fmt: skip
READERS: dict[str, Callable[[str], object]] = {
    "label_end": lambda w: label_end(w, 0),
    "closer_ahead": lambda w: closer_ahead(w, 0),
    "destination": lambda w: destination(w, 0),
    "dest_allowed": lambda w: dest_allowed(w, 0),
    "autolink": autolink,
    "starts_definition": lambda w: starts_definition(w, Edge.OPEN),
    "fence_opens": lambda w: fence_opens(w, Edge.OPEN),
    "fence_closes": lambda w: fence_closes(w, Fence("`", 3)),
}
UNDECIDED = (Want.MORE, None)
HOSTS = LinkHosts([".example.com", "e.com"])


@pytest.mark.parametrize("name", READERS)
def test_an_answer_never_changes_with_more_text(name: str) -> None:
    read, rng = READERS[name], random.Random(name)
    for _ in range(400):
        first = rng.choice("[<`~!")
        text = first + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 20)))
        answers = [read(text[:end]) for end in range(1, len(text) + 1)]
        decided = [a for a in answers if a not in UNDECIDED]
        assert all(a == decided[0] for a in decided), (text, answers)


@pytest.mark.parametrize(
    ("dest", "allowed"),
    [
        ("https://example.com", True), ("mailto:a@b.c", True), ("/relative", True), ("#x", True),
        ("//other.host/x", True), ("javascript:x", False), ("JavaScript:x", False),
        ("java&#115;cript:x", False), ("javascript&colon;x", False), ("javascript\\:x", False),
        ("&#32;javascript:x", False), ("java&#9;script:x", False), ("data:text/html,x", False),
        ("vbscript:x", False), ("file:///etc/passwd", False), ("tel:110", False),
    ],
)  # fmt: skip
def test_scheme_as_the_browser_reads_it(dest: str, allowed: bool) -> None:
    assert scheme_allowed(dest) is allowed


def test_destination_with_title_and_angle_brackets() -> None:
    assert destination('http://e/p.png "标题")后', 0) == (
        len('http://e/p.png "标题")'),
        "http://e/p.png",
    )
    assert destination("<a b.png>)", 0) == (len("<a b.png>)"), "a b.png")
    assert destination("a\n\nb)", 0) is Want.NO  # a blank line ends the paragraph


def test_destination_a_rewrite_could_still_change_counts_as_disallowed() -> None:
    assert dest_allowed("https://e.com/![x](y))", 0) is True  # the scheme is settled
    assert dest_allowed("java![s](u)cript:x)", 0) is False  # `s` could complete `javascript:`


def test_brackets_balance_and_escapes_count() -> None:
    assert label_end("[a [b] c] d", 0) == len("[a [b] c")
    assert label_end("[a \\] b] d", 0) == len("[a \\] b")
    assert label_end("[a\n\nb]", 0) is Want.NO


def test_autolink_scheme() -> None:
    assert autolink("<javascript:alert(1)>") == "javascript"
    assert autolink("<T:Clone>") is Want.NO  # a one-letter scheme is no autolink
    assert autolink("<a b:c>") is Want.NO


def test_definitions_but_not_footnotes() -> None:
    assert starts_definition("[r]: http://e/p.png", Edge.OPEN) is True
    assert starts_definition("[^1]: 注释", Edge.OPEN) is False
    assert starts_definition("[ ] 待办", Edge.OPEN) is False


def test_fences() -> None:
    assert fence_opens("```python\n", Edge.OPEN) == Fence("`", 3)
    assert fence_opens("``` a`b\n", Edge.OPEN) is Want.NO
    assert fence_closes("  ````\n", Fence("`", 3)) is True
    assert fence_closes(":::\n", Fence("`", 3)) is True
    assert fence_closes("code\n", Fence("`", 3)) is False


def test_inert_text_renders_as_itself() -> None:
    assert inert("a [b](c) ![d] <e> `f` \\[g") == "a \\[b\\]\\(c\\) \\!\\[d\\] \\<e\\> \\`f\\` \\[g"


URL_PIECES = ["https:", "//", "/", "\\", "&#47;", "&sol;", "&#4", "7;", ".", "www", "example.com",
              "evil.com", "@", "#", "?", ":", "80", ")", "中", " ", "\n", "!", "[", "]", "<", ">", "&"]  # fmt: skip
URL_READERS: dict[str, Callable[[str], object]] = {
    "dest_allowed with hosts": lambda w: dest_allowed(w, 0, HOSTS),
    "bare_url after https:": lambda w: bare_url("see https:", w, HOSTS, Edge.OPEN),
    "bare_url after www": lambda w: bare_url("www", w, HOSTS, Edge.OPEN),
}


@pytest.mark.parametrize("name", URL_READERS)
def test_a_url_answer_never_changes_with_more_text(name: str) -> None:
    read, rng = URL_READERS[name], random.Random(name)
    for _ in range(600):
        first = rng.choice(["/", ".", "&#47;", "\\/", "<", "h"])
        text = first + "".join(rng.choice(URL_PIECES) for _ in range(rng.randint(0, 12)))
        answers = [read(text[:end]) for end in range(1, len(text) + 1)]
        decided = [a for a in answers if a not in UNDECIDED]
        assert all(a == decided[0] for a in decided), (text, answers)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://example.com", True), ("https://docs.example.com/x?y#z", True),
        ("HTTPS://EXAMPLE.COM.:8443/", True), ("https://user:pw@e.com/", True),
        ("http:e.com", True), ("https:\\\\e.com/x", False),  # `\\` → `%5C`: no host
        ("/relative", True), ("../x", True), ("#x", True), ("?q", True), ("x/y", True),
        ("mailto:a@evil.com", True), ("javascript:x", True),  # no host: the scheme decides
        ("https://evil.com", False), ("https://example.com@evil.com", False),
        ("https://example.com\\@evil.com", False), ("https://evil.com#@example.com", False),
        ("https://evil.com\\.example.com", False), ("https://example.com.evil.com", False),
        ("https://notexample.com", False), ("https://e.com.", True), ("https://e.com..", False),
        ("//evil.com", False), ("/\\evil.com", False), ("\\\\evil.com", False), ("///evil.com", False),
        ("https:evil.com", False), ("https:///evil.com", False), (" \t//evil.com", False),
        ("https://example%2Ecom", False), ("https://exämple.com", False), ("https://[::1]/", False),
        ("https://", False), ("https://e.com:evil.com", True),  # a port that fails: no host at all
    ],
)  # fmt: skip
def test_host_as_the_browser_reads_it(url: str, allowed: bool) -> None:
    assert host_allowed(url, HOSTS) is allowed


def test_host_of_a_cut_url() -> None:
    assert host_allowed("https://example.com", HOSTS, complete=False) is None  # `.evil` may follow
    assert host_allowed("https://example.com/", HOSTS, complete=False) is True
    assert host_allowed("https://evil.com?", HOSTS, complete=False) is False
    assert host_allowed("/", HOSTS, complete=False) is None  # `//host` may follow
    assert host_allowed("/x", HOSTS, complete=False) is True


def test_destination_decoded_before_its_host_is_read() -> None:
    assert url_allowed("https://example.com\\@evil.com", HOSTS) is False  # `\\@` is `@`
    assert url_allowed("https://&#101;.com/", HOSTS) is True
    assert url_allowed("https&colon;//evil.com", HOSTS) is False
    assert url_allowed("javascript:x", None) is False and url_allowed("https://evil.com", None)


def test_destination_with_a_host_a_rewrite_could_change() -> None:
    assert dest_allowed("https://example.com/![x](y))", 0, HOSTS) is True  # host settled
    assert dest_allowed("https://example.com![x](y).evil.com)", 0, HOSTS) is False
    assert dest_allowed("https://evil.com)", 0) is True  # no hosts given: the scheme decides


def test_hosts_on_the_list() -> None:
    assert link_host(" Docs.Example.COM. ") == "docs.example.com"
    assert link_host(".example.com") == ".example.com"
    for entry in ["https://example.com", "example.com/", "example.com:80", "*.example.com", "a b",
                  "", ".", "例子.com", "[::1]"]:  # fmt: skip
        with pytest.raises(ValueError, match="link host"):
            link_host(entry)
    hosts = LinkHosts(["example.com", ".corp.example"])
    assert "example.com" in hosts and "www.example.com" not in hosts
    assert "corp.example" in hosts and "a.b.corp.example" in hosts
    assert "xcorp.example" not in hosts and "a..corp.example" not in hosts
    assert "evil*.corp.example" not in hosts and "EXAMPLE.COM" not in hosts  # callers lower-case
    assert "example.com" not in LinkHosts()


def test_decoded_as_commonmark_decodes() -> None:
    assert (
        decode("a\\:b \\x &#47;&#x2F;&sol; &amp; &bogus; &#0; &#47")
        == "a:b \\x /// & &bogus; \ufffd &#47"
    )


def test_autolink_destination() -> None:
    assert autolink_url("<https://e.com/a?b>") == "https://e.com/a?b"
    assert autolink_url("<https://e.com\\@x>") == "https://e.com\\@x"  # literal, no escapes
    assert autolink_url("<https://e.com/a") is Want.MORE
    assert autolink_url("<https://e.com a>") is Want.NO


def test_bare_url_breaks_only_what_gfm_would_link() -> None:
    wj = WORD_JOINER
    assert bare_url("见 https:", "//evil.com/x", HOSTS, Edge.END) == BareUrl(1, wj + "/", True)
    assert bare_url("HTTP:", "//e.com", HOSTS, Edge.END) == BareUrl(1, "/", False)
    assert bare_url("https:", "&#47;/evil.com", HOSTS, Edge.END) == BareUrl(5, wj + "&#47;", True)
    assert bare_url("https:", "\\/\\/evil.com", HOSTS, Edge.END) == BareUrl(2, wj + "\\/", True)
    assert bare_url("a www", ".evil.com", HOSTS, Edge.END) == BareUrl(1, wj + ".", True)
    assert bare_url("www", ".example.com", HOSTS, Edge.END) == BareUrl(1, ".", False)
    assert bare_url("file:", "//x/y", HOSTS, Edge.END) == BareUrl(1, "/", False)  # no link
    assert bare_url("https:", "/x", HOSTS, Edge.END) == BareUrl(1, "/", False)
    assert bare_url("3", ".14", HOSTS, Edge.END) == BareUrl(1, ".", False)
    assert bare_url("https:", "//e.com", HOSTS, Edge.OPEN) is Want.MORE  # `.evil.com` may follow
    assert bare_url("https:", "//e.com", HOSTS, Edge.FULL).defused  # undecided: the safe side


def test_bare_url_host_is_read_as_written() -> None:
    """GFM takes the host of a link it finds while parsing from the text as written (escapes and
    references left in), of one it finds afterwards from the decoded text: a `/` right after an
    allowed host keeps both on it."""
    for after in ["&sol;@evil.com", "\\@evil.com", "&#64;evil.com", "@evil.com", ")中文", "~x",
                  "*x*", "。然后"]:  # fmt: skip
        url = bare_url("https:", f"//e.com{after}", HOSTS, Edge.END)
        assert url == BareUrl(len("//e.com"), "//e.com/", False), after
    for after in [")", "),", "'.", " x", "/x", "?x", "#x", ":8443/x"]:  # left out of the link, or
        url = bare_url("https:", f"//e.com{after}", HOSTS, Edge.END)  # ending the host anyway
        assert url == BareUrl(1, "/", False), after


def test_inert_text_leaves_no_reference_open() -> None:
    assert inert("a &#4") == "a \\&#4"  # `7;` after it would make a `/`
    assert inert("a &amp; b") == "a &amp; b"
    assert inert("a \\&#4") == "a \\&#4"
