"""Chinese-aware chunking: a parsed document becomes token-budgeted, sentence-aligned chunks.

Text is cut into sentences at 。！？；… (and ASCII . ! ? ; when followed by a space, the end or a CJK
character) with any closing quotes or brackets after the mark kept with the sentence, and at line
ends. Sentences are packed into chunks of at most `chunk_tokens` tokens; each chunk repeats whole
sentences from the end of the previous one (about `overlap_tokens`). A change of heading always
starts a new chunk, and a sentence longer than the budget is cut by characters.

Chunk offsets index `ParsedDocument.text`, and `chunk.text == document.text[char_start:char_end]`, so
a citation can point at the exact passage. Headings are not part of `chunk.text`;
`Chunker.embedding_text` puts the heading in front for the embedder.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backend.errors import ConfigError
from backend.rag.document import Block, Chunk, ParsedDocument

logger = logging.getLogger(__name__)

# Han, kana, hangul, CJK punctuation and full-width forms: about one token per character.
_CJK = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_CJK_CHAR = re.compile(f"[{_CJK}\U00020000-\U0002ffff]")
_CLOSERS = "”’」』）)】》〉\"'"
_SENTENCE_END = re.compile(rf"(?:[。！？；…⋯]+|[.!?;]+(?=[\s{_CLOSERS}{_CJK}]|$))[{_CLOSERS}]*|\n")
# A hard split looks for its cut within this many characters per budget token.
_MAX_CHARS_PER_TOKEN = 12


def estimate_tokens(text: str) -> int:
    """A cheap token count: one per CJK character, one per 4 other characters, at least 1."""
    cjk = len(_CJK_CHAR.findall(text))
    return max(1, cjk + math.ceil((len(text) - cjk) / 4))


def split_sentences(text: str) -> list[tuple[int, int]]:
    """`(start, end)` spans of the sentences of `text`, without surrounding whitespace.

    An end mark and the closing quotes or brackets right after it belong to the sentence they end.
    Whitespace-only pieces are dropped.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        _append_trimmed(spans, text, start, match.end())
        start = match.end()
    _append_trimmed(spans, text, start, len(text))
    return spans


def _append_trimmed(spans: list[tuple[int, int]], text: str, start: int, end: int) -> None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start < end:
        spans.append((start, end))


@dataclass(frozen=True)
class _Unit:
    """A sentence (or a piece of an over-long one) in document coordinates."""

    start: int
    end: int
    tokens: int
    page: int | None


class Chunker:
    """Splits parsed documents into chunks of at most `chunk_tokens` tokens.

    `count_tokens` should be the embedder's own counter (`Embedder.count_tokens`); `estimate_tokens`
    is a cheap stand-in. Deterministic: the same document and settings give the same chunks. Holds no
    state between calls, so one instance may serve several threads if `count_tokens` can.
    Raises ConfigError when the sizes are inconsistent.
    """

    def __init__(
        self, count_tokens: Callable[[str], int], *, chunk_tokens: int, overlap_tokens: int
    ) -> None:
        if chunk_tokens < 1 or not 0 <= overlap_tokens < chunk_tokens:
            raise ConfigError(
                f"chunk sizes are inconsistent: chunk_tokens={chunk_tokens}, "
                f"overlap_tokens={overlap_tokens}; QWEN_RAG__CHUNK_TOKENS must be at least 1 and "
                "QWEN_RAG__CHUNK_OVERLAP_TOKENS between 0 and less than it"
            )
        self._count = count_tokens
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens

    def split(self, document: ParsedDocument) -> list[Chunk]:
        """The document's chunks, `index` 0..n-1 in reading order; none for a blank document.

        Each chunk lies within one heading section, holds whole sentences (unless one sentence alone
        exceeds the budget and was cut), and `tokens == count_tokens(text) <= chunk_tokens`.
        """
        text = document.text
        chunks: list[Chunk] = []
        for heading, units in self._sections(document.blocks, text):
            for members in self._pack(units, text):
                start, end = members[0].start, members[-1].end
                pages = [unit.page for unit in members if unit.page is not None]
                body = text[start:end]
                chunks.append(
                    Chunk(
                        index=len(chunks),
                        text=body,
                        char_start=start,
                        char_end=end,
                        tokens=self._count(body),
                        heading=heading,
                        page_start=min(pages) if pages else None,
                        page_end=max(pages) if pages else None,
                    )
                )
        return chunks

    def embedding_text(self, chunk: Chunk) -> str:
        """What the embedder reads for `chunk`: its heading path on a line of its own, then the text."""
        return f"{chunk.heading}\n{chunk.text}" if chunk.heading else chunk.text

    def _sections(self, blocks: Sequence[Block], text: str) -> list[tuple[str | None, list[_Unit]]]:
        """Runs of non-blank blocks under the same heading, as sentence units."""
        located: list[tuple[Block, int]] = []
        offset = 0
        misplaced = 0
        for block in blocks:
            misplaced += block.offset != offset
            if block.text.strip():
                located.append((block, offset))
            offset += len(block.text) + 1
        if misplaced:
            # Chunk offsets follow `ParsedDocument.text`, whatever the parser wrote.
            logger.warning("%d of %d block offsets disagree with the text", misplaced, len(blocks))
        sections: list[tuple[str | None, list[_Unit]]] = []
        for heading, run in itertools.groupby(located, key=lambda item: item[0].heading):
            units: list[_Unit] = []
            for block, base in run:
                for start, end in split_sentences(block.text):
                    units.extend(self._units(text, base + start, base + end, page=block.page))
            sections.append((heading, units))
        return sections

    def _units(self, text: str, start: int, end: int, *, page: int | None) -> list[_Unit]:
        """The sentence `text[start:end]` as one unit, or as budget-sized pieces when too long."""
        tokens = self._count(text[start:end])
        if tokens <= self.chunk_tokens:
            return [_Unit(start, end, tokens, page)]
        pieces: list[_Unit] = []
        while start < end:
            cut = self._cut(text, start, end)
            spans: list[tuple[int, int]] = []
            _append_trimmed(spans, text, start, cut)
            pieces.extend(_Unit(s, e, self._count(text[s:e]), page) for s, e in spans)
            start = cut
        return pieces

    def _cut(self, text: str, start: int, end: int) -> int:
        """Where the piece that begins at `start` ends: the furthest point within the budget,
        moved back to a whitespace in its second half if there is one. Always past `start`."""
        limit = min(end, start + self.chunk_tokens * _MAX_CHARS_PER_TOKEN)
        if self._count(text[start:limit]) <= self.chunk_tokens:
            return limit
        best, low, high = start + 1, start + 1, limit - 1
        while low <= high:
            middle = (low + high) // 2
            if self._count(text[start:middle]) <= self.chunk_tokens:
                best, low = middle, middle + 1
            else:
                high = middle - 1
        for position in range(best - 1, (start + best) // 2, -1):
            if text[position].isspace():
                return position
        return best

    def _pack(self, units: list[_Unit], text: str) -> list[list[_Unit]]:
        """Greedy packing of a section's units into chunks, each overlapping the previous one."""
        chunks: list[list[_Unit]] = []
        carried: list[_Unit] = []
        position = 0
        while position < len(units):
            first = units[position]
            while carried and sum(u.tokens for u in carried) + first.tokens > self.chunk_tokens:
                carried = carried[1:]
            members = [*carried, first]
            total = sum(u.tokens for u in members)
            position += 1
            while position < len(units) and total + units[position].tokens <= self.chunk_tokens:
                members.append(units[position])
                total += units[position].tokens
                position += 1
            # Unit counts add up only approximately (tokens may merge across a join): check the span.
            while len(members) > 1 and self._measure(members, text) > self.chunk_tokens:
                if len(members) - len(carried) > 1:
                    members.pop()
                    position -= 1
                else:
                    members.pop(0)
                    carried = carried[1:]
            chunks.append(members)
            carried = self._overlap(members)
        return chunks

    def _measure(self, members: list[_Unit], text: str) -> int:
        return self._count(text[members[0].start : members[-1].end])

    def _overlap(self, members: list[_Unit]) -> list[_Unit]:
        """The proper suffix of whole sentences whose size is closest to `overlap_tokens`."""
        best: list[_Unit] = []
        best_gap = self.overlap_tokens
        total = 0
        for size in range(1, len(members)):
            total += members[-size].tokens
            gap = abs(total - self.overlap_tokens)
            if gap < best_gap:
                best, best_gap = members[-size:], gap
            if total >= self.overlap_tokens:
                break
        return best
