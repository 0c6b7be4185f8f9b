"""Multi-pattern matching of a compiled lexicon against normalised text.

`Matcher` is immutable once built and safe to share between threads and tasks. A match is found by
Aho-Corasick on the normalised text (`backend/guard/normalize.py`), then kept only if:

- its letters lie at most `MAX_GAP` dropped characters apart in the original text (so `微【】信`
  matches 微信, but two words a sentence apart do not), which also bounds how long a match can be in
  the original text: `stretch(n) = n + (n - 1) * MAX_GAP` characters for an n-letter word;
- a word starting (ending) with an ASCII letter or digit is not glued to another one in the
  original (`vx` does not match inside `reviewx`, while `w e i x i n` matches weixin);
- no allow-list occurrence covers it (longest match wins: 微信支付 covers 微信);
- for `word` entries, jieba puts word boundaries at both of its ends (大麻 in 吸大麻, not in 大麻烦).
  Segmentation is the slow part, so it runs only around such candidate matches.

Two automata hold the same keys:

- `finder` (daachorse: Rust, a character-wise double-array Aho-Corasick) scans whole texts in
  `check`, straight over the `str`, and reports character offsets. Its states are addressed by
  character codes in a compact double array, so a Chinese character costs one transition where a
  byte automaton pays two (UTF-16) or three (UTF-8); with 10k Chinese words it scans ~1.7x faster
  than ahocorasick-rs's contiguous NFA over UTF-16 code units (bench/README.md), and builds in
  ~10 ms.
- `automaton` (pyahocorasick, over UTF-8 bytes carried in latin-1 strings) is resumable: its search
  state carries over from one piece of text to the next, which the stream filter
  (`backend/guard/stream.py`) needs. Over characters its nodes would have thousands of children,
  searched linearly; over UTF-8 bytes at most a few dozen, and UTF-8 is self-synchronising.

A text without a match costs `fold` and one scan (~3 µs for 100 Chinese
characters); the map back to the original, occurrences and verdict are built only for texts with
one (~10 µs more per hit, ~20 µs for an evasion, whose letters must be mapped through the dropped
characters).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import ahocorasick
import daachorse

from backend.errors import LexiconError
from backend.guard.lexicon import Entry, Lexicon, Severity
from backend.guard.normalize import fold, normalize, spellings
from backend.guard.segment import Segmenter
from backend.guard.verdict import CLEAN, Hit, Verdict, apply_mask, verdict

MAX_GAP = 3  # dropped characters allowed between two letters of a match, in the original text
_SEGMENT_CONTEXT = 12  # normalised characters of context on each side when segmenting


def stretch(letters: int) -> int:
    """Longest original span of a match of `letters` normalised characters."""
    return letters + (letters - 1) * MAX_GAP if letters else 0


@dataclass(frozen=True)
class Pattern:
    """One compiled lexicon (or allow-list, `entry` None) word."""

    entry: Entry | None
    length: int  # normalised characters
    ascii_start: bool
    ascii_end: bool
    contextual: bool  # its neighbours decide a match: an ASCII end, or a `word` entry

    @classmethod
    def of(cls, entry: Entry | None, key: str) -> Pattern:
        """The pattern of normalised `key`, spelling `entry` (None: an allow-list word)."""
        start, end = _ascii(key[0]), _ascii(key[-1])
        whole_word = entry is not None and entry.whole_word
        return cls(entry, len(key), start, end, start or end or whole_word)


@dataclass(frozen=True, slots=True)
class Occurrence:
    start: int  # normalised, [start, end)
    end: int
    pattern: Pattern


class Track(Protocol):
    """Normalised text addressed by absolute index, with the way back to the original."""

    def char(self, index: int) -> str:
        """The normalised character, or "" outside what the track holds."""
        ...

    def origin(self, index: int) -> int: ...


class Matcher:
    """A compiled lexicon: build once, share freely. Building takes ~0.5 s per 10k words, plus
    ~0.5 s for the character tables the first time in a process. Raises LexiconError for a word
    that normalises to nothing."""

    def __init__(self, lexicon: Lexicon, *, segmenter: Segmenter) -> None:
        self._segmenter = segmenter
        self.patterns: list[Pattern] = []
        keys: dict[str, list[int]] = {}
        owners: list[Entry | None] = [*lexicon.entries, *(None for _ in lexicon.allow)]
        words = [entry.word for entry in lexicon.entries] + list(lexicon.allow)
        for owner, word, forms in zip(owners, words, spellings(words), strict=True):
            if not forms[0]:
                raise LexiconError(f"{word!r} has no letters or digits left after normalisation")
            for key in forms:
                keys.setdefault(key, []).append(len(self.patterns))
                self.patterns.append(Pattern.of(owner, key))
        self.automaton = ahocorasick.Automaton()
        for key, indices in keys.items():
            self.automaton.add_word(_latin(key), tuple(indices))
        self.automaton.make_automaton()
        self.finder = daachorse.CharwiseDoubleArrayAhoCorasick(list(keys))
        self._key_patterns = [tuple(indices) for indices in keys.values()]  # by finder pattern
        self._find = self.finder.find_overlapping
        self.max_allow = max((p.length for p in self.patterns if p.entry is None), default=0)
        allow_keys = [key for key in keys if any(self.patterns[i].entry is None for i in keys[key])]
        self.hold_chars = stretch(self._longest_stream_word(allow_keys)) + 1
        """Characters the stream filter holds back: the longest original span of a block/mask
        word or of an allow-list entry that contains one, plus one for the boundary check."""
        streamed_keys = [
            k for k, ix in keys.items() if any(_streamed(self.patterns[i]) for i in ix)
        ]
        self.stream_prefixes = frozenset(
            key[:n] for key in (*streamed_keys, *allow_keys) for n in range(1, len(key) + 1)
        )
        """Every beginning of a block/mask word or allow-list entry (normalised): the stream filter
        holds back only a tail of the answer that is one of these, i.e. could still grow into a
        match or into an allow-list entry that would cover one."""
        self.longest_prefix = max(map(len, self.stream_prefixes), default=0)

    def check(self, text: str) -> Verdict:
        """Verdict on `text`; pure, safe from any thread. CPU-bound: ~20 ms per MB of Chinese
        with a 10k-word lexicon (bench/guard.py), a few µs for a short message."""
        folded = fold(text)
        found = self._find(folded)  # (start, end, key): every occurrence of every key
        if not found:  # the common case, kept short
            return CLEAN
        normalized = normalize(text, folded=folded)
        patterns, key_patterns = self.patterns, self._key_patterns
        occurrences = [
            Occurrence(start, end, patterns[index])
            for start, end, key in found
            for index in key_patterns[key]
        ]
        if not normalized.verbatim:  # else every match is letters side by side in the original
            gap = normalized.longest_gap
            occurrences = [o for o in occurrences if gap(o.start, o.end) <= MAX_GAP]
        if any(o.pattern.contextual for o in occurrences):
            track = _WholeText(normalized.text, normalized.origin)
            occurrences = [
                o
                for o in occurrences
                if not o.pattern.contextual or (self.bounded(o, track) and self.whole(o, track))
            ]
        span = normalized.span
        return verdict([hit(o, span(o.start, o.end)) for o in self.uncovered(occurrences)])

    def mask(self, text: str) -> str:
        """`text` with every mask-severity match replaced by ＊, one per original character."""
        spans = [h.span for h in self.check(text).hits if h.severity is Severity.MASK]
        return apply_mask(text, spans)

    def bounded(self, occurrence: Occurrence, track: Track) -> bool:
        """False when an ASCII word is glued to more of the same in the original: a letter to a
        letter (`vx` in `vxworks`) or a digit to a digit. `vx123` and `加qq123` still match."""
        start, end = occurrence.start, occurrence.end
        if occurrence.pattern.ascii_start:
            first, before = track.char(start), track.char(start - 1)
            if _same_kind(first, before) and track.origin(start - 1) >= track.origin(start) - 1:
                return False
        if occurrence.pattern.ascii_end:
            last, after = track.char(end - 1), track.char(end)
            if _same_kind(last, after) and track.origin(end) <= track.origin(end - 1) + 1:
                return False
        return True

    def whole(self, occurrence: Occurrence, track: Track) -> bool:
        """For `word` entries: jieba segments the occurrence as a word of its own."""
        entry = occurrence.pattern.entry
        if entry is None or not entry.whole_word:
            return True
        context = _SEGMENT_CONTEXT
        before = "".join(track.char(i) for i in range(occurrence.start - context, occurrence.start))
        word = "".join(track.char(i) for i in range(occurrence.start, occurrence.end))
        after = "".join(track.char(i) for i in range(occurrence.end, occurrence.end + context))
        cuts, position = {0}, 0
        for token in self._segmenter.cut(before + word + after):
            position += len(token)
            cuts.add(position)
        return len(before) in cuts and len(before) + len(word) in cuts

    def uncovered(self, occurrences: list[Occurrence]) -> list[Occurrence]:
        """Lexicon occurrences that no allow-list occurrence covers."""
        allows = [(o.start, o.end) for o in occurrences if o.pattern.entry is None]
        if not allows:
            return occurrences
        allows.sort()
        starts = [start for start, _ in allows]
        kept = []
        for occurrence in occurrences:
            if occurrence.pattern.entry is None:
                continue
            j = bisect.bisect_right(starts, occurrence.start) - 1
            while j >= 0 and allows[j][0] >= occurrence.end - self.max_allow:
                if allows[j][1] >= occurrence.end:
                    break
                j -= 1
            else:
                kept.append(occurrence)
        return kept

    def _longest_stream_word(self, allow_keys: list[str]) -> int:
        strict = {i for i, pattern in enumerate(self.patterns) if _streamed(pattern)}
        longest = max((self.patterns[i].length for i in strict), default=0)
        for key in allow_keys:
            inner = (i for _, indices in self.automaton.iter(_latin(key)) for i in indices)
            if any(i in strict for i in inner):
                longest = max(longest, len(key))
        return longest


def hit(occurrence: Occurrence, span: tuple[int, int]) -> Hit:
    """The hit of a lexicon (not allow-list) occurrence at original `span`."""
    entry = occurrence.pattern.entry
    assert entry is not None
    return Hit(entry.category, entry.severity, entry.word, span)


class _WholeText:
    def __init__(self, text: str, origin: Callable[[int], int]) -> None:
        self._text = text
        self._origin = origin

    def char(self, index: int) -> str:
        return self._text[index] if 0 <= index < len(self._text) else ""

    def origin(self, index: int) -> int:
        return self._origin(index)


def _streamed(pattern: Pattern) -> bool:
    """Whether the stream filter acts on this pattern (block and mask entries)."""
    entry = pattern.entry
    return entry is not None and entry.severity in (Severity.BLOCK, Severity.MASK)


def _ascii(char: str) -> bool:
    return char.isascii() and char.isalnum()


def _same_kind(char: str, neighbour: str) -> bool:
    """Both ASCII letters, or both ASCII digits."""
    if not (_ascii(char) and _ascii(neighbour)):
        return False
    return char.isdigit() == neighbour.isdigit()


def _latin(text: str) -> str:
    return text.encode().decode("latin-1")
