"""Verdicts and masking."""

from __future__ import annotations

from backend.guard import Action, Hit, Severity
from backend.guard.verdict import CLEAN, apply_mask, verdict


def _hit(severity: Severity, start: int) -> Hit:
    return Hit("c", severity, "w", (start, start + 2))


def test_no_hits_is_clean() -> None:
    assert verdict([]) is CLEAN


def test_strictest_severity_wins() -> None:
    result = verdict([_hit(Severity.FLAG, 0), _hit(Severity.BLOCK, 4), _hit(Severity.MASK, 2)])
    assert result.action is Action.BLOCK


def test_mask_outranks_flag() -> None:
    assert verdict([_hit(Severity.FLAG, 0), _hit(Severity.MASK, 2)]).action is Action.MASK


def test_hits_sorted_by_span() -> None:
    result = verdict([_hit(Severity.FLAG, 4), _hit(Severity.FLAG, 0)])
    assert [hit.span for hit in result.hits] == [(0, 2), (4, 6)]


def test_apply_mask_with_offset_clips_to_text() -> None:
    assert apply_mask("abcdef", [(8, 12), (14, 20)], offset=10) == "＊＊cd＊＊"
