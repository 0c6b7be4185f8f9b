"""The answer stream's stages between the engine and the UI, each a small async generator:

engine deltas ▸ prepend(first) ▸ filtered(CitationFilter: drop [n] with no source)
▸ filtered(MarkdownFilter: no images, links to allow-listed hosts only) ▸ screened (guard hold-back)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from backend.errors import EngineError
from backend.guard import Release, StreamGuard


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
    deltas: AsyncGenerator[str, None], screen: StreamGuard | None
) -> AsyncGenerator[Release, None]:
    """What may be shown of the stream: every delta through the guard's hold-back filter, then the
    held-back tail once the stream ends -- or fails, since what the engine did say is still
    checked and shown. Stops after a blocked release. Without a guard, deltas pass as they are."""
    if screen is None:
        async for delta in deltas:
            yield Release(delta)
        return
    try:
        async for delta in deltas:
            release = screen.feed(delta)
            yield release
            if release.blocked is not None:
                return
    except EngineError:
        yield screen.finish()
        raise
    yield screen.finish()


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
