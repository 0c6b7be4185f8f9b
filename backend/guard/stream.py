"""The streaming output filter: a blocked word never reaches the client, however it is split.

`StreamGuard` holds back only the tail of the answer that could still become (part of) a match: the
longest end of the normalised text that begins a block/mask word or an allow-list entry
(`Matcher.stream_prefixes`), with the inserted characters after it as long as they stay within
`MAX_GAP`. Everything before that cannot be part of any match still to come, so it is released at
once; a complete match at the very end is a beginning of itself, so it waits for the next
character (the ASCII boundary check) or the end of the answer. So when text is released, every
match that touches it has been seen whole and decided, including whether a benign superstring
(微信支付) covers it. (At most `Matcher.hold_chars` characters are ever held for a match; the
track keeps that much history for the checks.)

- a block match stops the stream: its `Release` carries the verdict, no text, and nothing is
  released afterwards (the caller replaces the answer with a notice and audits it);
- a mask match is released as ＊ (one per original character);
- flag entries do not change the output and are not tracked here: run `Matcher.check` on the
  whole answer for the audit record.

Evasions longer than the bound (more than `MAX_GAP` characters between two letters) are not
matches by definition, in the stream as in `Matcher.check`; both give the same decisions on the
same text (clause breaks such as `，` and `。` end a match in both). Matching is incremental (the
Aho-Corasick state carries across deltas), and work is batched: the filter scans the first delta
at once, then once at least `batch_chars` new characters have arrived or a delta comes
`max_delay_s` after its last scan, so a burst costs little and a stream at an LLM's pace is
released delta by delta, behind the engine only by a possible match's beginning. Cost (bench/guard.py, token-sized deltas): ~0.5 ms
of CPU per 1000 characters at 16, ~2 ms when scanning on every delta.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from backend.guard.lexicon import Severity
from backend.guard.matcher import MAX_GAP, Matcher, Occurrence, Track, hit
from backend.guard.normalize import normalize
from backend.guard.verdict import Hit, Verdict, apply_mask, verdict

_TRIM_AT = 1024  # normalised characters of history kept before trimming the track
_FAR_BEFORE = -(1 << 60)  # origin reported for trimmed characters: no match can reach them


@dataclass(frozen=True)
class Release:
    """Text that may go to the client now (possibly empty), and the verdict once blocked."""

    text: str
    blocked: Verdict | None = None


_NOTHING = Release("")


class StreamGuard:
    """Filters one streamed answer. Not thread-safe: one per stream, fed from one task.

    Positions in verdicts are indices in the whole answer as fed (the concatenated deltas).
    """

    def __init__(
        self, matcher: Matcher, *, batch_chars: int = 16, max_delay_s: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        """Scans the first delta at once, then once `batch_chars` new characters wait or when a
        delta arrives `max_delay_s` or more after the last scan: a burst of deltas (a replay, an
        engine flushing several at once) is scanned in batches (cheap), a stream at an LLM's pace
        (tens of milliseconds a token) at every delta, so the guard delays nothing it need not."""
        self._matcher = matcher
        self._hold = matcher.hold_chars
        self._batch = max(batch_chars, 1)
        self._max_delay_s = max_delay_s
        self._clock = clock
        self._last_scan = -float("inf")  # the first delta is scanned at once: nothing to batch yet
        self._scanner = _Scanner(matcher)
        self._held = ""  # fed, not yet released; starts at original index self._released
        self._released = 0
        self._scanned = 0  # original characters normalised and searched
        self._track = _StreamTrack()
        self._pending: list[Occurrence] = []  # block/mask occurrences not yet decided
        self._allows: list[Occurrence] = []  # recent allow-list occurrences
        self._masks: list[tuple[int, int]] = []  # decided mask spans not yet fully released
        self._hits: list[Hit] = []
        self._blocked: Verdict | None = None
        self._finished = False

    @property
    def verdict(self) -> Verdict:
        """The block and mask hits acted on so far."""
        return self._blocked or verdict(self._hits)

    def feed(self, delta: str) -> Release:
        """Add the next piece of the answer; returns what may be shown now.

        Raises RuntimeError after `finish`.
        """
        if self._finished:
            raise RuntimeError("StreamGuard.feed after finish")
        if self._blocked is not None:
            return Release("", self._blocked)
        self._held += delta
        waiting = self._released + len(self._held) - self._scanned
        if waiting < self._batch and self._clock() - self._last_scan < self._max_delay_s:
            return _NOTHING
        return self._advance(final=False)

    def finish(self) -> Release:
        """The answer is complete: decide what is left and release it (or block)."""
        if self._finished:
            raise RuntimeError("StreamGuard.finish called twice")
        self._finished = True
        if self._blocked is not None:
            return Release("", self._blocked)
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> Release:
        self._last_scan = self._clock()
        self._scan()
        decided_to = self._scanned if final else self._open_match_start()
        if self._decide(decided_to):
            return Release("", self._blocked)
        end = max(self._released, decided_to)
        cut = end - self._released
        text = self._held[:cut]
        if self._masks:
            text = apply_mask(text, self._masks, offset=self._released)
            self._masks = [span for span in self._masks if span[1] > end]
        self._held = self._held[cut:]
        self._released = end
        if self._track.size > 2 * _TRIM_AT:
            self._trim()
        return Release(text) if text else _NOTHING

    def _scan(self) -> None:
        new = self._held[self._scanned - self._released :]
        normalized = normalize(new)
        self._track.extend(normalized.text, normalized.origins(offset=self._scanned))
        self._scanned += len(new)
        for occurrence in self._scanner.feed(normalized.text, self._track):
            entry = occurrence.pattern.entry
            if entry is None:
                self._allows.append(occurrence)
            elif entry.severity in (Severity.BLOCK, Severity.MASK):
                self._pending.append(occurrence)

    def _open_match_start(self) -> int:
        """Original index where a match that may still grow could begin: the start of the
        longest end of the normalised text that begins a word or allow entry, if the inserted
        characters after it are still within MAX_GAP; else everything scanned."""
        track, prefixes = self._track, self._matcher.stream_prefixes
        tail = track.tail(self._matcher.longest_prefix)
        for k in range(len(tail), 0, -1):
            if tail[len(tail) - k :] in prefixes:
                last = track.origin(track.end - 1)
                if self._scanned - 1 - last <= MAX_GAP:
                    return track.origin(track.end - k)
                break
        return self._scanned

    def _decide(self, decided_to: int) -> bool:
        """Decide pending occurrences starting before `decided_to`; True when one blocks."""
        if not self._pending:
            return False
        track, waiting, blocks = self._track, [], []
        for occurrence in self._pending:
            start = track.origin(occurrence.start)
            if start >= decided_to:
                waiting.append(occurrence)
                continue
            if not self._matcher.bounded(occurrence, track) or self._covered(occurrence):
                continue
            span = (start, track.origin(occurrence.end - 1) + 1)
            found = hit(occurrence, span)
            self._hits.append(found)
            if found.severity is Severity.BLOCK:
                blocks.append(found)
            else:
                self._masks.append(span)
        self._pending = waiting
        if blocks:
            self._blocked = verdict(self._hits)
        return bool(blocks)

    def _covered(self, occurrence: Occurrence) -> bool:
        return any(
            allow.start <= occurrence.start
            and occurrence.end <= allow.end
            and self._matcher.bounded(allow, self._track)
            for allow in self._allows
        )

    def _trim(self) -> None:
        keep_from = self._track.index_of(self._released - self._hold - 1)
        self._track.drop_before(keep_from)
        self._allows = [allow for allow in self._allows if allow.end > keep_from]


class _Scanner:
    """Aho-Corasick (`Matcher.automaton`) over normalised text fed piece by piece: the search
    state carries over, so a word split between pieces is found."""

    def __init__(self, matcher: Matcher) -> None:
        self._patterns = matcher.patterns
        self._search = matcher.automaton.iter("")
        self._bytes = 0  # bytes fed so far
        self._chars = 0  # normalised characters fed so far

    def feed(self, piece: str, track: Track) -> Iterator[Occurrence]:
        """Occurrences ending in `piece` (absolute normalised indices) whose letters lie close
        enough together in the original; boundaries, allow-list and segmentation not applied.
        `track` must hold every character of the occurrences; consume the iterator before the
        next feed."""
        raw = piece.encode()
        base_bytes, base_chars = self._bytes, self._chars
        self._bytes += len(raw)
        self._chars += len(piece)
        self._search.set(raw.decode("latin-1"), False)
        return self._occurrences(raw, track, base_bytes=base_bytes, base_chars=base_chars)

    def _occurrences(
        self, raw: bytes, track: Track, *, base_bytes: int, base_chars: int
    ) -> Iterator[Occurrence]:
        """Occurrences from the search over the UTF-8 text `raw`, which starts at byte
        `base_bytes` of the search and at normalised index `base_chars`."""
        single = raw.isascii()  # byte index == character index
        done_bytes, done_chars = 0, 0
        for last_byte, indices in self._search:
            local = last_byte - base_bytes
            if single:
                end = local + 1
            else:
                end = done_chars + len(raw[done_bytes : local + 1].decode())
                done_bytes, done_chars = local + 1, end
            for index in indices:
                pattern = self._patterns[index]
                occurrence = Occurrence(
                    base_chars + end - pattern.length, base_chars + end, pattern
                )
                if _close(occurrence, track.origin):
                    yield occurrence


def _close(occurrence: Occurrence, origin: Callable[[int], int]) -> bool:
    """Whether the letters of `occurrence` lie at most `MAX_GAP` characters apart in the original."""
    previous = origin(occurrence.start)
    for index in range(occurrence.start + 1, occurrence.end):
        current = origin(index)
        if current - previous - 1 > MAX_GAP:
            return False
        previous = current
    return True


class _StreamTrack:
    """The normalised stream (recent part) with the original index of each character."""

    def __init__(self) -> None:
        self.base = 0  # absolute normalised index of self._text[0]
        self._text = ""
        self._origins: list[int] = []

    @property
    def size(self) -> int:
        return len(self._origins)

    @property
    def end(self) -> int:
        """Absolute normalised index just past the last character."""
        return self.base + len(self._text)

    def tail(self, n: int) -> str:
        """The last `n` normalised characters (fewer if fewer are kept)."""
        return self._text[-n:] if n > 0 else ""

    def extend(self, text: str, origins: list[int]) -> None:
        self._text += text
        self._origins += origins

    def char(self, index: int) -> str:
        local = index - self.base
        return self._text[local] if 0 <= local < len(self._text) else ""

    def origin(self, index: int) -> int:
        """Original index; characters trimmed away lie "far before" everything kept."""
        local = index - self.base
        return self._origins[local] if local >= 0 else _FAR_BEFORE

    def index_of(self, origin: int) -> int:
        """Absolute index of the first normalised character whose origin is >= `origin`."""
        return self.base + bisect.bisect_left(self._origins, origin)

    def drop_before(self, index: int) -> None:
        cut = index - self.base
        self._text = self._text[cut:]
        del self._origins[:cut]
        self.base = index
