"""Text normalisation for matching, with a map back to the original text.

Each source character is normalised on its own, so the result of a text is the concatenation of the
results of its characters (this is what lets the stream filter normalise delta by delta):

1. `str.lower()` (case folding; `lower` rather than `casefold` so "ß" stays one character);
2. NFKC per character: full-width → half-width, compatibility forms (circled letters, ligatures);
3. traditional → simplified, character by character (OpenCC `t2s` applied to single characters,
   so a character maps the same way whatever its neighbours; lexicon words go through the same
   function, so both sides agree even where OpenCC's phrase tables would choose differently);
4. fillers dropped: punctuation, symbols (emoji included), whitespace, control and format characters
   (zero-width space/joiner, BOM, soft hyphen), private-use characters and combining marks;
5. except clause breaks, which are kept as they are: line breaks and the Chinese clause and
   sentence marks `。，、；：？！` (and their half-width forms). Ordinary text puts them between
   words all the time, so bridging them would join the end of one clause to the start of the
   next (年，景 → 年景) and flag running text; evasions use symbols and spaces, which are dropped.

So `微【】信`, `微\u200b信`, `w e i x i n`, `ＷｅｉＸｉｎ` and `微信` all normalise to the same letters,
while `微，信` keeps its comma. Digits and letters are kept: `微1信` is not `微信`. How far apart the
letters of a match may be in the source is the matcher's business (`backend/guard/matcher.py`),
which uses `Normalized.origin`.

Most text needs no change beyond `lower()`: one regular-expression search over a bitmap of the
characters the steps above touch tells, and such a text costs ~10 ns per character. `fold` gives
the normalised letters alone, for callers that need the map back only when something matched.

The character tables are built on first use (about a second: every code point is classified once
per process) and shared read-only afterwards; importing this module does no work.
"""

from __future__ import annotations

import bisect
import functools
import re
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import opencc

BREAKS = frozenset("\n\r\u2028\u2029。，、；：？！｡､")  # kept: a match never spans them
# Categories whose characters are dropped: punctuation, symbols, separators, controls, format,
# private use, surrogates, non-spacing and enclosing marks.
_FILLER_CATEGORIES = frozenset(
    {"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp"}
    | {"Cc", "Cf", "Co", "Cs", "Mn", "Me"}
)
_BMP_MAX = 0xFFFF
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
# Blocks whose characters OpenCC may convert (CJK unified ideographs A-F and compatibility ones).
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2EBEF))


@dataclass(frozen=True)
class _Tables:
    """Character classes are split at the BMP: `re` tests a BMP-only class with a bitmap, but
    walks a list of ranges once any member lies beyond it (~40x slower on these classes)."""

    translate: dict[int, str | None]  # code point → its one-character form, None when dropped
    expand: dict[str, str]  # characters whose form has two or more characters
    fillers: re.Pattern[str]  # BMP characters dropped
    changes: re.Pattern[str]  # BMP characters changed one-to-one
    slow: re.Pattern[str]  # BMP characters that need the per-character path
    special: re.Pattern[str]  # `slow` or any astral character: one search for the common case
    astral_slow: frozenset[str]  # ... and such characters beyond the BMP
    dropped: re.Pattern[str]  # BMP fillers or any astral character (filtered by `translate`)
    touched: re.Pattern[
        str
    ]  # any character normalisation changes or drops, or astral; after lower()

    def change(self, match: re.Match[str]) -> str:
        """Replacement for one matched character: its form, "" when dropped."""
        char = match[0]
        return self.translate.get(ord(char), char) or ""


class _Origins:
    """Normalised index → source index, computed on first use (most texts have no hit to map).

    The result is the same whichever thread computes it first, so the lazy fill needs no lock.
    """

    __slots__ = ("_dropped", "_explicit", "_lowered", "_marks")

    def __init__(self, *, lowered: str | None = None, explicit: list[int] | None = None) -> None:
        self._lowered = lowered  # source after lower(): same length, fillers at the same places
        self._explicit = explicit
        self._dropped: list[int] | None = None
        self._marks: list[int] | None = None

    def __call__(self, index: int) -> int:
        if self._explicit is not None:
            return self._explicit[index]
        if self._lowered is None:  # nothing was dropped
            return index
        marks = self._marks
        if marks is None:
            # marks[j]: source characters kept before the j-th dropped one.
            marks = self._marks = [position - j for j, position in enumerate(self.dropped())]
        return index + bisect.bisect_right(marks, index)

    def dropped(self) -> list[int]:
        """Source indices of the dropped characters (fast path only)."""
        if self._dropped is None:
            assert self._lowered is not None
            tables = _tables()
            found = tables.dropped.finditer(self._lowered)
            self._dropped = [
                m.start() for m in found if tables.translate.get(ord(m[0]), "") is None
            ]
        return self._dropped

    def all(self, length: int, offset: int) -> list[int]:
        if self._explicit is not None:
            return [offset + origin for origin in self._explicit]
        if self._lowered is None:
            return list(range(offset, offset + length))
        origins: list[int] = []
        kept_from = 0
        for position in self.dropped():
            origins.extend(range(offset + kept_from, offset + position))
            kept_from = position + 1
        origins.extend(range(offset + kept_from, offset + len(self._lowered)))
        return origins


_SAME = _Origins()  # nothing dropped or expanded: the identity, shared


@dataclass(frozen=True)
class Normalized:
    """A normalised text and the way back to its source.

    `origin(i)` is the index in `source` of the character that produced `text[i]` (several
    normalised characters may share one source character, e.g. "㎏" → "kg").
    """

    text: str
    source: str
    _origins: _Origins = field(repr=False, compare=False)

    @property
    def verbatim(self) -> bool:
        """Whether `text[i]` comes from `source[i]` for every i (nothing dropped or expanded)."""
        return self._origins is _SAME

    def origin(self, index: int) -> int:
        """Source index of `text[index]`; raises IndexError outside the text."""
        if not 0 <= index < len(self.text):
            raise IndexError(index)
        return self._origins(index)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Source span [start, end) covering normalised `text[start:end]` (non-empty)."""
        return self.origin(start), self.origin(end - 1) + 1

    def origins(self, *, offset: int = 0) -> list[int]:
        """`offset` + the source index of every normalised character, in order (non-decreasing)."""
        return self._origins.all(len(self.text), offset)


def normalize(text: str) -> Normalized:
    """Normalise `text` (see the module docstring). Pure; safe from any thread."""
    tables = _tables()
    lowered = text.lower()
    if len(lowered) == len(text) and tables.touched.search(lowered) is None:
        return Normalized(lowered, text, _SAME)
    return _normalize_changed(text, lowered, tables)


def fold(text: str) -> str:
    """`normalize(text).text`, without building the map back. Pure; safe from any thread."""
    tables = _tables()
    lowered = text.lower()
    if len(lowered) == len(text) and tables.touched.search(lowered) is None:
        return lowered
    return _normalize_changed(text, lowered, tables).text


def _normalize_changed(text: str, lowered: str, tables: _Tables) -> Normalized:
    """`normalize(text)` for a text with something to change; `lowered` is `text.lower()`."""
    astral: list[str] = []
    if tables.special.search(text) is not None:
        astral = _ASTRAL.findall(text)
        if tables.slow.search(text) or not tables.astral_slow.isdisjoint(astral):
            return _normalize_slow(text, tables)
    # here lower() gave one character per character
    # Changed and astral characters are rare in simplified text: replacing them one by one beats
    # a translate() over every character (~70 ns each). Fillers go in one C-level pass.
    out = lowered if not astral else _ASTRAL.sub(tables.change, lowered)
    out = tables.fillers.sub("", tables.changes.sub(tables.change, out))
    if len(out) == len(text):
        return Normalized(out, text, _SAME)
    return Normalized(out, text, _Origins(lowered=lowered))


def normalize_word(word: str) -> str:
    """The normalised form of a lexicon word (same function as for texts)."""
    return normalize(word).text


def spellings(words: list[str]) -> list[list[str]]:
    """For each word, its normalised form followed by those of its traditional spellings
    (OpenCC s2t, s2tw, s2hk) where they differ.

    Character-by-character t2s cannot undo every phrase-level s2t: 家具 is written 傢俱 in
    traditional text, and 俱 is also a simplified character, so 傢俱 normalises to 家俱. Matching
    these spellings too catches such words. Builds three OpenCC converters: call at compile time.
    """
    keys = [[normalize_word(word)] for word in words]
    joined = "\n".join(word.replace("\n", " ") for word in words)
    for config in ("s2t", "s2tw", "s2hk"):
        converted = opencc.OpenCC(config).convert(joined).split("\n")
        for own, variant in zip(keys, converted, strict=True):
            key = normalize_word(variant)
            if key and key not in own:
                own.append(key)
    return keys


def _normalize_slow(text: str, tables: _Tables) -> Normalized:
    pieces: list[str] = []
    origins: list[int] = []
    for index, char in enumerate(text):
        for low in char.lower():
            form = tables.expand.get(low)
            if form is None:
                mapped = tables.translate.get(ord(low), low)
                form = "" if mapped is None else mapped
            pieces.append(form)
            origins.extend([index] * len(form))
    return Normalized("".join(pieces), text, _Origins(explicit=origins))


@functools.cache
def _tables() -> _Tables:
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
    bmp_fillers = _char_class([point for point in fillers if point <= _BMP_MAX])
    # Negated, the class of BMP characters kept as they are also matches every astral character,
    # and stays a bitmap (a class listing astral members is searched range by range).
    touched = set(translate) | {ord(char) for char in expand}
    kept = _char_class([point for point in range(_BMP_MAX + 1) if point not in touched])
    slow_bmp = _char_class([point for point in slow if point <= _BMP_MAX])
    return _Tables(
        translate=translate,
        expand=expand,
        fillers=re.compile(bmp_fillers),
        changes=re.compile(_char_class([point for point in changed if point <= _BMP_MAX])),
        slow=re.compile(slow_bmp),
        special=re.compile(f"{slow_bmp}|{_ASTRAL.pattern}"),
        astral_slow=frozenset(chr(point) for point in slow if point > _BMP_MAX),
        dropped=re.compile(f"{bmp_fillers}|{_ASTRAL.pattern}"),
        touched=re.compile(f"[^{kept[1:]}"),
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
