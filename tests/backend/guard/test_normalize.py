"""Normalisation: each transformation, and the map back to the original text."""

from __future__ import annotations

import itertools
import random

import pytest

from backend.guard.normalize import fold, normalize, normalize_word


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("ＷｅｉＸｉｎ１２３", "weixin123"),  # full width and case
        ("WeiXin", "weixin"),
        ("賭博與發票", "赌博与发票"),  # traditional → simplified
        ("微【】信", "微信"),  # inserted punctuation
        ("微 信\u3000号", "微信号"),  # spaces, ideographic space
        ("微\u200b信\u200d号\ufeff", "微信号"),  # zero-width characters
        ("微😀信★号", "微信号"),  # emoji and symbols
        ("w e i x i n", "weixin"),  # spaced-out letters
        ("ⓦⓔⓘ𝐱𝐢𝐧", "weixin"),  # circled and mathematical letters
        ("微\u0301信", "微信"),  # combining mark
        ("İ㎏ﬁ", "ikgfi"),  # characters that expand
    ],
)
def test_normalizes(source: str, expected: str) -> None:
    assert normalize(source).text == expected


@pytest.mark.parametrize("source", ["赌，博", "赌。博", "赌、博", "赌\n博", "赌！博"])
def test_clause_breaks_are_kept(source: str) -> None:
    assert normalize(source).text == source


def test_ascii_punctuation_is_dropped() -> None:
    assert normalize("w.e,i!x").text == "weix"


def test_digits_are_kept() -> None:
    assert normalize("微1信").text == "微1信"


def test_origins_skip_dropped_characters() -> None:
    assert normalize("微【】信 号").origins() == [0, 3, 5]


def test_origins_of_expanded_characters_repeat() -> None:
    assert normalize("a㎏b").origins() == [0, 1, 1, 2]


def test_origins_with_astral_fillers() -> None:
    assert normalize("微😀😀信𝐱").origins() == [0, 3, 4]


def test_astral_character_that_expands() -> None:
    normalized = normalize("a🅪b")  # RAISED MC SIGN → "mc"
    assert (normalized.text, normalized.origins()) == ("amcb", [0, 1, 1, 2])


def test_origins_are_offset() -> None:
    assert normalize("微 信").origins(offset=10) == [10, 12]


def test_span_maps_back_to_original() -> None:
    source = "请加 微【】信 吧"
    normalized = normalize(source)
    start = normalized.text.index("微信")
    begin, end = normalized.span(start, start + 2)
    assert source[begin:end] == "微【】信"


def test_origin_outside_raises() -> None:
    with pytest.raises(IndexError):
        normalize("微信").origin(2)


def test_word_and_text_normalise_alike() -> None:
    assert normalize_word("代開發票") == normalize("代开发票").text


_ALPHABET = "微信代开发票aBZ9 -*【】，。\u200b😀𝐱🅪㎏İ賭Ａ\u0301𠀀"


def _random_texts(count: int) -> list[str]:
    rng = random.Random(5)
    return ["".join(rng.choices(_ALPHABET, k=rng.randint(0, 12))) for _ in range(count)]


@pytest.mark.parametrize("text", _random_texts(150))
def test_fold_agrees_with_normalize(text: str) -> None:
    normalized = normalize(text)
    given = normalize(text, folded=fold(text))
    assert (fold(text), given.text, given.origins()) == (
        normalized.text,
        normalized.text,
        normalized.origins(),
    )


@pytest.mark.parametrize("text", _random_texts(150))
def test_longest_gap_matches_origins(text: str) -> None:
    normalized = normalize(text)
    origins = normalized.origins()
    for start in range(len(origins)):
        for end in range(start + 1, len(origins) + 1):
            gaps = [b - a - 1 for a, b in itertools.pairwise(origins[start:end])]
            assert normalized.longest_gap(start, end) == max(gaps, default=0)
    assert [normalized.origin(i) for i in range(len(origins))] == origins
