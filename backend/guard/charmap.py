"""How each character normalises: its form, and regular-expression classes over the forms.

`charmap()` classifies every code point once per process (about half a second) on first use and
is shared read-only afterwards; importing this module does no work. `backend/guard/normalize.py`
applies it (the steps are described there).

Character classes are split at the BMP: `re` tests a BMP-only class with a bitmap, but walks a
list of ranges once any member lies beyond it (~40x slower on these classes). A negated class of
BMP characters stays a bitmap and matches every astral character too, which is how `touched`,
`uncased` and `special` catch those in one bitmap test per character.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import opencc

BREAKS = frozenset("\n\r\u2028\u2029。，、；：？！｡､")  # kept: a match never spans them
# Categories whose characters are dropped: punctuation, symbols, separators, controls, format,
# private use, surrogates, non-spacing and enclosing marks.
_FILLER_CATEGORIES = frozenset(
    {"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp"}
    | {"Cc", "Cf", "Co", "Cs", "Mn", "Me"}
)
BMP_MAX = 0xFFFF
ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # any character beyond the BMP
# Blocks whose characters OpenCC may convert (CJK unified ideographs A-F and compatibility ones).
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2EBEF))


@dataclass(frozen=True)
class CharMap:
    """Every code point's normalised form, and classes of characters (BMP, unless said)."""

    translate: dict[int, str | None]  # code point → its one-character form, None when dropped
    expand: dict[str, str]  # characters whose form has two or more characters
    fillers: re.Pattern[str]  # BMP characters dropped
    changes: re.Pattern[str]  # BMP characters changed one-to-one
    slow: re.Pattern[str]  # BMP characters that need the per-character path
    special: re.Pattern[str]  # `slow` or any astral character: one search for the common case
    astral_slow: frozenset[str]  # ... and such characters beyond the BMP
    filler_runs: re.Pattern[str]  # runs of BMP fillers
    dropped_runs: re.Pattern[str]  # runs of BMP fillers and astral characters
    # any character normalisation or lower() changes or drops, and every astral character
    touched: re.Pattern[str]
    uncased: re.Pattern[str]  # `touched` but ASCII capitals, which lower() maps one to one

    def change(self, match: re.Match[str]) -> str:
        """Replacement for one matched character: its form, "" when dropped."""
        char = match[0]
        return self.translate.get(ord(char), char) or ""


@functools.cache
def charmap() -> CharMap:
    converter = opencc.OpenCC("t2s")
    t2s = _single_char_conversions(converter, _code_points(_CJK_RANGES))
    translate: dict[int, str | None] = {}
    expand: dict[str, str] = {}
    fillers: list[int] = []
    slow: list[int] = []
    cased: list[str] = []
    for point in range(sys.maxunicode + 1):
        char = chr(point)
        category = unicodedata.category(char)
        if category == "Cn":  # unassigned: kept as it is
            continue
        if char.lower() != char:
            cased.append(char)
        form = _form(char, category, t2s)
        if form == char:
            continue
        if form == "":
            translate[point] = None
            fillers.append(point)
        elif len(form) == 1:
            translate[point] = form
        else:
            expand[char] = form
            slow.append(point)
    # texts are lowered before the tables apply: lower() must give one character that does not expand
    slow.extend(ord(c) for c in cased if len(c.lower()) != 1 or c.lower() in expand)
    changed = [point for point, form in translate.items() if form is not None]
    bmp_fillers = _char_class([point for point in fillers if point <= BMP_MAX])
    # Negated, the class of BMP characters kept as they are also matches every astral character,
    # and stays a bitmap (a class listing astral members is searched range by range).
    touched = set(translate) | {ord(char) for char in [*expand, *cased]}
    kept = _char_class([point for point in range(BMP_MAX + 1) if point not in touched])
    capitals = range(ord("A"), ord("Z") + 1)
    uncased = _char_class([p for p in range(BMP_MAX + 1) if p not in touched or p in capitals])
    slow_bmp = _char_class([point for point in slow if point <= BMP_MAX])
    not_slow = _char_class(sorted(set(range(BMP_MAX + 1)).difference(slow)))
    return CharMap(
        translate=translate,
        expand=expand,
        fillers=re.compile(bmp_fillers),
        changes=re.compile(_char_class([point for point in changed if point <= BMP_MAX])),
        slow=re.compile(slow_bmp),
        special=re.compile(f"[^{not_slow[1:]}"),
        astral_slow=frozenset(chr(point) for point in slow if point > BMP_MAX),
        filler_runs=re.compile(f"{bmp_fillers}+"),
        dropped_runs=re.compile(f"(?:{bmp_fillers}|{ASTRAL.pattern})+"),
        touched=re.compile(f"[^{kept[1:]}"),
        uncased=re.compile(f"[^{uncased[1:]}"),
    )


def _form(char: str, category: str, t2s: dict[str, str]) -> str:
    if char in BREAKS:
        return char
    if char.isascii():
        return "" if category in _FILLER_CATEGORIES else char.lower()
    compat = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", char).lower())
    kept = (c for c in compat if unicodedata.category(c) not in _FILLER_CATEGORIES)
    return "".join(t2s.get(c, c) for c in kept)


def _code_points(ranges: Iterable[tuple[int, int]]) -> list[str]:
    return [
        chr(point)
        for low, high in ranges
        for point in range(low, high + 1)
        if unicodedata.category(chr(point)) != "Cn"
    ]


def _single_char_conversions(converter: opencc.OpenCC, chars: list[str]) -> dict[str, str]:
    # One call over all characters, one per line: no phrase spans a newline.
    converted = converter.convert("\n".join(chars)).split("\n")
    if len(converted) != len(chars):  # pragma: no cover - OpenCC keeps lines
        raise RuntimeError("OpenCC changed the number of lines")
    table = {
        source: target
        for source, target in zip(chars, converted, strict=True)
        if source != target and len(target) == 1
    }
    # A few targets convert again (薴 → 苧 → 苎): follow them so the function is idempotent.
    for source, target in table.items():
        seen = {source}
        while target in table and target not in seen:
            seen.add(target)
            target = table[target]
        table[source] = target
    return table


def _char_class(points: list[int]) -> str:
    if not points:
        return "(?!)"
    ranges: list[tuple[int, int]] = []
    for point in sorted(points):
        if ranges and point == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], point)
        else:
            ranges.append((point, point))
    parts = (
        re.escape(chr(low)) if low == high else f"{re.escape(chr(low))}-{re.escape(chr(high))}"
        for low, high in ranges
    )
    return "[" + "".join(parts) + "]"
