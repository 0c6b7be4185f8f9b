"""JSON-able verdicts, for the admin CLI (`qwen-stack guard check`) and audit records."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from backend.guard.matcher import Matcher
from backend.guard.verdict import Verdict


def verdict_json(verdict: Verdict, text: str) -> dict[str, object]:
    """`{"blocked", "action", "category", "hits": [{"word", "category", "severity", "span",
    "text"}]}`; `category` is that of the first strictest hit (None when clean), `span` is
    [start, end) in `text` and `text` the matched original characters."""
    strictest = [hit for hit in verdict.hits if hit.severity.value == verdict.action.value]
    return {
        "blocked": verdict.blocked,
        "action": verdict.action.value,
        "category": strictest[0].category if strictest else None,
        "hits": [
            {
                "word": hit.word,
                "category": hit.category,
                "severity": hit.severity.value,
                "span": [hit.span[0], hit.span[1]],
                "text": text[hit.span[0] : hit.span[1]],
            }
            for hit in verdict.hits
        ],
    }


def check_lines(lines: Iterable[str], matcher: Matcher) -> Iterator[dict[str, object]]:
    """One `verdict_json` per input line (its line ending removed), in order, lazily."""
    for line in lines:
        text = line.removesuffix("\n").removesuffix("\r")
        yield verdict_json(matcher.check(text), text)
