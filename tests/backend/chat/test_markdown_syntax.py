"""The CommonMark readers behind the answer filter: what they read, and that an answer, once
given, never changes as more text arrives (the filter's chunking invariance rests on it)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from backend.chat.markdown_syntax import (
    Edge,
    Fence,
    Want,
    autolink,
    closer_ahead,
    dest_allowed,
    destination,
    fence_closes,
    fence_opens,
    inert,
    label_end,
    scheme_allowed,
    starts_definition,
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
