"""The lexicon in force: compiled once, swapped when its files change, without a restart."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend.errors import LexiconError
from backend.guard.lexicon import Lexicon, lexicon_files
from backend.guard.matcher import Matcher
from backend.guard.segment import Segmenter

logger = logging.getLogger(__name__)

_Fingerprint = tuple[tuple[str, int, int], ...]


class LexiconStore:
    """The current `Matcher` for a lexicon folder (or file), reloaded when the files change.

    `current()` is cheap: at most every `check_interval_s` seconds it stats the lexicon files and,
    when a file was added, removed or changed (name, size, mtime), builds a new `Matcher` and swaps
    it in with one assignment, so callers see the old or the new lexicon, never a mix; a
    `StreamGuard` keeps the matcher it started with. Building runs in the calling thread (~0.5 s
    for 10k words); async processes construct the store with `check_interval_s=math.inf`, so
    `current()` never touches the disk, and run `watch` as a task, which reloads from a worker
    thread.

    A reload that fails (malformed line, unreadable file) keeps the previous matcher and logs the
    error; only the first load, in the constructor, raises LexiconError. Thread-safe.
    """

    def __init__(
        self,
        path: Path,
        *,
        segmenter: Segmenter,
        check_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._segmenter = segmenter
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._fingerprint = _fingerprint(path)
        self._matcher = Matcher(Lexicon.load(path), segmenter=segmenter)
        self._checked_at = clock()

    def current(self) -> Matcher:
        """The matcher in force, after a reload if the check interval has passed."""
        if self._clock() - self._checked_at >= self._interval:
            self.reload()
        return self._matcher

    async def watch(self, interval_s: float) -> None:
        """`reload` in a worker thread every `interval_s` seconds, until cancelled: the files are
        checked, and a changed lexicon built, off the event loop (a build takes ~0.5 s for 10k
        words, which would stall every stream of the process)."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.reload)

    def reload(self) -> bool:
        """Rebuild now if the files changed; True when a new matcher was swapped in.

        Never raises for a bad lexicon (see the class docstring). A concurrent caller finds the
        lock taken and returns False at once, keeping the matcher in force.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._checked_at = self._clock()
            try:
                fingerprint = _fingerprint(self._path)
                if fingerprint == self._fingerprint:
                    return False
                matcher = Matcher(Lexicon.load(self._path), segmenter=self._segmenter)
            except LexiconError as exc:
                logger.error("lexicon reload failed, keeping the previous one: %s", exc)
                return False
            self._matcher, self._fingerprint = matcher, fingerprint
            logger.info("lexicon reloaded from %s", self._path)
            return True
        finally:
            self._lock.release()


def _fingerprint(path: Path) -> _Fingerprint:
    try:
        stats = [(file.name, file.stat()) for file in lexicon_files(path)]
    except OSError as exc:
        raise LexiconError(f"cannot read lexicon {path}: {exc}") from exc
    return tuple((name, stat.st_mtime_ns, stat.st_size) for name, stat in stats)
