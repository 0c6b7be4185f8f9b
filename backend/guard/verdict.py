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


@dataclass(frozen=True, slots=True)
class Hit:
    category: str
    severity: Severity
    word: str  # the lexicon entry as written
    span: tuple[int, int]  # [start, end) in the original text


@dataclass(frozen=True, slots=True)
class Verdict:
    """The strictest action over `hits` (sorted by span); `none` with no hits."""

    action: Action
    hits: tuple[Hit, ...] = ()

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK


CLEAN = Verdict(Action.NONE)
_ACTIONS = {severity.rank: Action(severity.value) for severity in Severity}  # by rank (an int)


def verdict(hits: Iterable[Hit]) -> Verdict:
    """The verdict over `hits`: the strictest severity decides the action."""
    ordered = tuple(hits)
    if not ordered:
        return CLEAN
    if len(ordered) == 1:  # the common case
        return Verdict(_ACTIONS[ordered[0].severity.rank], ordered)
    ordered = tuple(sorted(ordered, key=lambda hit: (hit.span, -hit.severity.rank, hit.word)))
    return Verdict(_ACTIONS[max([hit.severity.rank for hit in ordered])], ordered)


def apply_mask(text: str, spans: Iterable[tuple[int, int]], *, offset: int = 0) -> str:
    """`text` (starting at original index `offset`) with `spans` replaced by ＊ per character."""
    chars = list(text)
    for start, end in spans:
        for index in range(max(start - offset, 0), min(end - offset, len(chars))):
            chars[index] = MASK_CHAR
    return "".join(chars)
