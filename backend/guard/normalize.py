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

Most Chinese text needs no change at all, or only ASCII capitals lowered: a regular-expression
search over a bitmap of the characters the steps above change tells (~4 ns per character), and
only other texts take the substitutions. `fold` gives the normalised letters alone, for callers
that need the map back only when something matched (`normalize(text, folded=...)` then builds it
without folding again). The map back is computed lazily: the identity, the runs of dropped
characters (searched by bisection), or an explicit list when a character expanded.

The character tables (`backend/guard/charmap.py`) are built on first use, about half a second
once per process; importing this module does no work.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

import opencc

from backend.guard.charmap import ASTRAL, CharMap, charmap


class _Origins:
    """Normalised index → source index, computed on first use (most texts have no hit to map).

    Explicit (a list), the identity, or, when normalisation only dropped characters, the runs of
    dropped source characters. The result is the same whichever thread computes it first, so
    the lazy fill needs no lock.
    """

    __slots__ = ("_astral", "_explicit", "_lowered", "_runs")

    def __init__(
        self,
        *,
        lowered: str | None = None,
        astral: bool = False,
        explicit: list[int] | None = None,
    ) -> None:
        self._lowered = lowered  # source after lower(): same length, fillers at the same places
        self._astral = astral  # whether `lowered` holds characters beyond the BMP
        self._explicit = explicit
        self._runs: _Runs | None = None

    def __call__(self, index: int) -> int:
        if self._explicit is not None:
            return self._explicit[index]
        if self._lowered is None:  # nothing was dropped
            return index
        runs = self.runs()
        return index + runs.shifts[bisect.bisect_right(runs.marks, index)]

    def longest_gap(self, start: int, end: int) -> int:
        """Most source characters between those of two consecutive normalised ones in
        [start, end) (-1: both come from one source character)."""
        explicit = self._explicit
        if explicit is not None:
            pairs = itertools.pairwise(explicit[start:end])
            return max((b - a - 1 for a, b in pairs), default=0)
        if self._lowered is None:
            return 0
        runs = self.runs()  # the runs after text[start] and before text[end - 1]:
        first = bisect.bisect_left(runs.marks, start + 1)
        last = bisect.bisect_right(runs.marks, end - 1)
        return max(runs.lengths[first:last], default=0)

    def runs(self) -> _Runs:
        """The runs of dropped source characters (not for explicit origins)."""
        if self._runs is None:
            assert self._lowered is not None
            self._runs = _Runs.of(self._lowered, charmap(), astral=self._astral)
        return self._runs

    def all(self, length: int, offset: int) -> list[int]:
        if self._explicit is not None:
            return [offset + origin for origin in self._explicit]
        if self._lowered is None:
            return list(range(offset, offset + length))
        origins: list[int] = []
        kept_from = 0
        for start, end in self.runs().spans:
            origins.extend(range(offset + kept_from, offset + start))
            kept_from = end
        origins.extend(range(offset + kept_from, offset + len(self._lowered)))
        return origins


@dataclass(frozen=True, slots=True)
class _Runs:
    """Maximal runs of dropped characters in a source text where nothing else changes length."""

    spans: list[tuple[int, int]]  # source [start, end), in order
    marks: list[int]  # per run, the source characters kept before it
    shifts: list[int]  # shifts[k]: characters dropped in the first k runs
    lengths: list[int]  # per run, its length

    @classmethod
    def of(cls, lowered: str, tables: CharMap, *, astral: bool) -> _Runs:
        """The runs in `lowered` (astral: whether it holds characters beyond the BMP)."""
        if not astral:
            spans = [match.span() for match in tables.filler_runs.finditer(lowered)]
        else:  # astral characters are dropped or not, as `translate` says
            spans = [match.span() for match in tables.dropped_runs.finditer(lowered)]
            found = ASTRAL.finditer(lowered)
            kept = [m.start() for m in found if tables.translate.get(ord(m[0]), "") is not None]
            if kept:
                spans = _without(spans, kept)
        lengths = [end - start for start, end in spans]
        shifts = [0, *itertools.accumulate(lengths)]
        marks = [start - shift for (start, _), shift in zip(spans, shifts, strict=False)]
        return cls(spans, marks, shifts, lengths)


_SAME = _Origins()  # nothing dropped or expanded: the identity, shared


@dataclass(frozen=True, slots=True)
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

    def longest_gap(self, start: int, end: int) -> int:
        """The most source characters between those of two consecutive characters of
        `text[start:end]`: 0 when side by side, -1 when one source character gave both."""
        return self._origins.longest_gap(start, end)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Source span [start, end) covering normalised `text[start:end]` (non-empty)."""
        return self.origin(start), self.origin(end - 1) + 1

    def origins(self, *, offset: int = 0) -> list[int]:
        """`offset` + the source index of every normalised character, in order (non-decreasing)."""
        return self._origins.all(len(self.text), offset)


def normalize(text: str, *, folded: str | None = None) -> Normalized:
    """Normalise `text` (see the module docstring). `folded`, when given, must be `fold(text)`:
    only the map back is then built, not the letters again. Pure; safe from any thread."""
    tables = charmap()
    if folded is None:
        folded = fold(text)
    if folded is text:  # nothing changed
        return Normalized(text, text, _SAME)
    astral = _astral_chars(text, tables)
    if astral is None:
        return _normalize_slow(text, tables)
    if len(folded) == len(text):  # one character per character, none dropped
        return Normalized(folded, text, _SAME)
    return Normalized(folded, text, _Origins(lowered=text.lower(), astral=bool(astral)))


def fold(text: str) -> str:
    """`normalize(text).text`, without building the map back. Pure; safe from any thread."""
    tables = charmap()
    first = tables.touched.search(text)
    if first is None:  # nothing to change
        return text
    lowered = text.lower()
    if tables.uncased.search(text, first.start()) is None:  # only ASCII capitals
        return lowered
    astral = _astral_chars(text, tables)
    if astral is None:
        return _normalize_slow(text, tables).text
    # Here lower() gave one character per character. Changed and astral characters are rare in
    # simplified text: replacing them one by one beats a translate() over every character
    # (~70 ns each). Fillers go in one C-level pass.
    out = lowered if not astral else ASTRAL.sub(tables.change, lowered)
    return tables.fillers.sub("", tables.changes.sub(tables.change, out))


def _astral_chars(text: str, tables: CharMap) -> list[str] | None:
    """The characters of `text` beyond the BMP, or None when `text` needs the per-character path
    (a character whose form, or lowercase, has more than one character)."""
    if tables.special.search(text) is None:
        return []
    astral = ASTRAL.findall(text)
    if tables.slow.search(text) or not tables.astral_slow.isdisjoint(astral):
        return None
    return astral


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


def _without(spans: list[tuple[int, int]], kept: list[int]) -> list[tuple[int, int]]:
    """`spans` (in order) split so that none holds an index in `kept` (sorted)."""
    out = []
    for start, end in spans:
        i = bisect.bisect_left(kept, start)
        while i < len(kept) and kept[i] < end:
            if start < kept[i]:
                out.append((start, kept[i]))
            start, i = kept[i] + 1, i + 1
        if start < end:
            out.append((start, end))
    return out


def _normalize_slow(text: str, tables: CharMap) -> Normalized:
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
