"""Character tables: forms are stable, and the classes that pick the fast paths."""

from __future__ import annotations

import pytest

from backend.guard.charmap import charmap
from backend.guard.normalize import normalize


def test_every_form_is_stable() -> None:
    table = charmap()
    forms = [form for form in table.translate.values() if form] + list(table.expand.values())
    assert [form for form in forms if normalize(form).text != form] == []


def test_plain_chinese_is_untouched() -> None:
    assert charmap().touched.search("今天天气很好，我们去公园散步吧。\n2025年abc") is None


@pytest.mark.parametrize("char", ["A", " ", "-", "\u200b", "賭", "Ａ", "ß".upper(), "😀", "𠀀"])
def test_touched(char: str) -> None:
    assert charmap().touched.search(char) is not None


def test_capitals_are_not_uncased() -> None:
    assert charmap().uncased.search("ABCXYZ") is None


@pytest.mark.parametrize("char", [" ", "賭", "Ä", "𝐱"])
def test_uncased(char: str) -> None:
    assert charmap().uncased.search(char) is not None
