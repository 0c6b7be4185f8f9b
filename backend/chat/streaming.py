"""The answer stream's stages between the engine and the UI, each a small async generator:

engine deltas ▸ prepend(first) ▸ cite (drop [n] with no source) ▸ screened (guard hold-back)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from backend.chat.grounding import CitationFilter
from backend.errors import EngineError
from backend.guard import Release, StreamGuard


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


async def cite(
    deltas: AsyncGenerator[str, None], citations: CitationFilter | None
) -> AsyncGenerator[str, None]:
    """Deltas with citations to no source removed (a `[` held until its citation is complete);
    without a filter, deltas pass as they are."""
    if citations is None:
        async for delta in deltas:
            yield delta
        return
    try:
        async for delta in deltas:
            if text := citations.feed(delta):
                yield text
    except EngineError:  # what the engine did say is still shown
        if rest := citations.finish():
            yield rest
        raise
    if rest := citations.finish():
        yield rest
