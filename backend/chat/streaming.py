"""The answer stream's stages between the engine and the UI, each a small async generator:

engine deltas ▸ prepend(first) ▸ filtered(CitationFilter: drop [n] with no source)
▸ filtered(MarkdownFilter: no images, links to allow-listed hosts only) ▸ screened (guard hold-back)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from backend.errors import EngineError
from backend.guard import Release, StreamGuard, Verdict


@dataclass(frozen=True)
class Shown:
    """A piece of the answer that may be shown now: the part of one delta fed to the guard, with
    the time (`time.monotonic`) that delta reached it -- earlier than now when the guard held it
    back (`backend/chat/pacing.py` spaces the text by it). The last piece of a blocked stream has
    no text and the verdict."""

    text: str
    arrived: float
    blocked: Verdict | None = None


class TextFilter(Protocol):
    """A hold-back filter over a stream of text (`CitationFilter`, `MarkdownFilter`)."""

    def feed(self, delta: str) -> str: ...

    def finish(self) -> str: ...


async def prepend(
    first: str, rest: AsyncGenerator[str, None], count: Callable[[], None]
) -> AsyncGenerator[str, None]:
    """`first` (when not empty), then the rest of the stream; `count()` once per delta."""
    if first:
        count()
        yield first
    async for delta in rest:
        count()
        yield delta


async def screened(
    deltas: AsyncGenerator[str, None],
    screen: StreamGuard | None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[Shown, None]:
    """What may be shown of the stream: every delta through the guard's hold-back filter, then the
    held-back tail once the stream ends -- or fails, since what the engine did say is still
    checked and shown. Stops after a blocked release. A release is cut where the deltas it holds
    were cut, each piece stamped with its delta's arrival (masking keeps lengths, so indices
    line up). Without a guard, deltas pass as they are."""
    if screen is None:
        async for delta in deltas:
            yield Shown(delta, clock())
        return
    arrivals = _Arrivals()
    try:
        async for delta in deltas:
            arrivals.fed(len(delta), clock())
            release = screen.feed(delta)
            for piece in arrivals.pieces(release):
                yield piece
            if release.blocked is not None:
                return
    except EngineError:
        for piece in arrivals.pieces(screen.finish()):
            yield piece
        raise
    for piece in arrivals.pieces(screen.finish()):
        yield piece


class _Arrivals:
    """When each character fed to the guard arrived, by delta."""

    def __init__(self) -> None:
        self._ends: deque[tuple[int, float]] = deque()  # (end index of a fed delta, its arrival)
        self._fed = 0
        self._shown = 0

    def fed(self, length: int, at: float) -> None:
        self._fed += length
        self._ends.append((self._fed, at))

    def pieces(self, release: Release) -> Iterator[Shown]:
        text = release.text
        while text:
            end, at = self._ends[0]
            take = min(end - self._shown, len(text))
            yield Shown(text[:take], at)
            text = text[take:]
            self._shown += take
            if self._shown >= end:
                self._ends.popleft()
        if release.blocked is not None:
            yield Shown("", self._ends[0][1] if self._ends else 0.0, release.blocked)


async def filtered(
    deltas: AsyncGenerator[str, None], text_filter: TextFilter | None
) -> AsyncGenerator[str, None]:
    """Deltas through the filter (what it holds back comes out with a later delta, the rest when
    the stream ends -- or fails, since what the engine did say is still shown); empty pieces are
    not yielded. Without a filter, deltas pass as they are."""
    if text_filter is None:
        async for delta in deltas:
            yield delta
        return
    try:
        async for delta in deltas:
            if text := text_filter.feed(delta):
                yield text
    except EngineError:
        if rest := text_filter.finish():
            yield rest
        raise
    if rest := text_filter.finish():
        yield rest
