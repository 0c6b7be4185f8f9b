"""What the guard decided about a text: the hits, their strictest severity, and masking."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from backend.guard.lexicon import Severity

MASK_CHAR = "＊"


class Action(enum.StrEnum):
    BLOCK = "block"
    MASK = "mask"
    FLAG = "flag"
    NONE = "none"


@dataclass(frozen=True)
class Hit:
    category: str
    severity: Severity
    word: str  # the lexicon entry as written
    span: tuple[int, int]  # [start, end) in the original text


@dataclass(frozen=True)
class Verdict:
    """The strictest action over `hits` (sorted by span); `none` with no hits."""

    action: Action
    hits: tuple[Hit, ...] = ()

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK


CLEAN = Verdict(Action.NONE)


def verdict(hits: Iterable[Hit]) -> Verdict:
    """The verdict over `hits`: the strictest severity decides the action."""
    ordered = tuple(sorted(hits, key=lambda hit: (hit.span, -hit.severity.rank, hit.word)))
    if not ordered:
        return CLEAN
    strictest = max((hit.severity for hit in ordered), key=lambda severity: severity.rank)
    return Verdict(Action(strictest.value), ordered)


def apply_mask(text: str, spans: Iterable[tuple[int, int]], *, offset: int = 0) -> str:
    """`text` (starting at original index `offset`) with `spans` replaced by ＊ per character."""
    chars = list(text)
    for start, end in spans:
        for index in range(max(start - offset, 0), min(end - offset, len(chars))):
            chars[index] = MASK_CHAR
    return "".join(chars)
