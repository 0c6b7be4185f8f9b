"""JSON verdicts for the admin CLI."""

from __future__ import annotations

import json

from backend.guard import Matcher, check_lines, verdict_json


def test_one_verdict_per_line(matcher: Matcher) -> None:
    lines = ["今天天气很好\n", "请加微【】信\r\n", "他喜欢赌博"]
    assert [r["blocked"] for r in check_lines(lines, matcher)] == [False, True, False]


def test_verdict_shape(matcher: Matcher) -> None:
    (report,) = check_lines(["请加微【】信"], matcher)
    assert report == {
        "blocked": True,
        "action": "block",
        "category": "广告引流",
        "hits": [
            {"word": "加微信", "category": "广告引流", "severity": "block", "span": [1, 6],
             "text": "加微【】信"},
            {"word": "微信", "category": "广告引流", "severity": "flag", "span": [2, 6],
             "text": "微【】信"},
        ],
    }  # fmt: skip


def test_clean_line_has_no_category(matcher: Matcher) -> None:
    assert verdict_json(matcher.check("你好"), "你好")["category"] is None


def test_is_json_serialisable(matcher: Matcher) -> None:
    reports = list(check_lines(["一夜情", "六合彩"], matcher))
    assert json.loads(json.dumps(reports, ensure_ascii=False)) == reports
