"""Reloading: an edited lexicon folder takes effect without a restart; a broken edit does not."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
from pathlib import Path

import pytest

from backend.errors import LexiconError
from backend.guard import LexiconStore, Segmenter


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, text: str, *, stamp: int) -> None:
    """Write and set a distinct mtime, so a change never hides in the clock's resolution."""
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(stamp * 10**9, stamp * 10**9))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _write(tmp_path / "words.tsv", "赌博\t赌博\tblock\n", stamp=1)
    return tmp_path


def _words(store: LexiconStore, text: str) -> list[str]:
    return [hit.word for hit in store.current().check(text).hits]


def test_edited_file_is_picked_up(folder: Path, segmenter: Segmenter) -> None:
    store = LexiconStore(folder, segmenter=segmenter, check_interval_s=0)
    _write(folder / "words.tsv", "赌博\t赌博\tblock\n六合彩\t赌博\tblock\n", stamp=2)
    assert _words(store, "买六合彩") == ["六合彩"]


def test_new_allow_file_is_picked_up(folder: Path, segmenter: Segmenter) -> None:
    store = LexiconStore(folder, segmenter=segmenter, check_interval_s=0)
    _write(folder / "extra.allow", "赌博罪\n", stamp=2)
    assert _words(store, "赌博罪") == []


def test_unchanged_files_keep_the_matcher(folder: Path, segmenter: Segmenter) -> None:
    store = LexiconStore(folder, segmenter=segmenter, check_interval_s=0)
    first = store.current()
    assert store.reload() is False
    assert store.current() is first


def test_checks_at_most_every_interval(folder: Path, segmenter: Segmenter) -> None:
    clock = _Clock()
    store = LexiconStore(folder, segmenter=segmenter, check_interval_s=10, clock=clock)
    _write(folder / "words.tsv", "六合彩\t赌博\tblock\n", stamp=2)
    clock.now = 9.0
    assert _words(store, "六合彩") == []
    clock.now = 10.0
    assert _words(store, "六合彩") == ["六合彩"]


def test_broken_edit_keeps_previous_lexicon(
    folder: Path, segmenter: Segmenter, caplog: pytest.LogCaptureFixture
) -> None:
    store = LexiconStore(folder, segmenter=segmenter, check_interval_s=0)
    _write(folder / "words.tsv", "六合彩\t赌博\tforbidden\n", stamp=2)
    with caplog.at_level(logging.ERROR, logger="backend.guard.store"):
        assert _words(store, "赌博") == ["赌博"]
    assert "words.tsv:1" in caplog.text


def test_fixed_edit_after_broken_one_loads(folder: Path, segmenter: Segmenter) -> None:
    store = LexiconStore(folder, segmenter=segmenter, check_interval_s=0)
    _write(folder / "words.tsv", "六合彩\t赌博\tforbidden\n", stamp=2)
    store.reload()
    _write(folder / "words.tsv", "六合彩\t赌博\tblock\n", stamp=3)
    assert store.reload() is True
    assert _words(store, "六合彩赌博") == ["六合彩"]


def test_first_load_raises(tmp_path: Path, segmenter: Segmenter) -> None:
    with pytest.raises(LexiconError):
        LexiconStore(tmp_path / "missing", segmenter=segmenter)


def test_without_an_interval_current_never_reloads(folder: Path, segmenter: Segmenter) -> None:
    store = LexiconStore(folder, segmenter=segmenter, check_interval_s=math.inf)
    _write(folder / "words.tsv", "六合彩\t赌博\tblock\n", stamp=2)
    assert _words(store, "六合彩") == []  # only `reload` / `watch` pick the edit up
    assert store.reload() is True and _words(store, "六合彩") == ["六合彩"]


async def test_watch_reloads_in_a_worker_thread(folder: Path, segmenter: Segmenter) -> None:
    store = LexiconStore(folder, segmenter=segmenter, check_interval_s=math.inf)
    loop_thread, reload_threads = threading.get_ident(), []
    reload = store.reload

    def recording_reload() -> bool:
        reload_threads.append(threading.get_ident())
        return reload()

    store.reload = recording_reload  # type: ignore[method-assign]
    _write(folder / "words.tsv", "六合彩\t赌博\tblock\n", stamp=2)
    watching = asyncio.create_task(store.watch(0.01))
    try:
        async with asyncio.timeout(10):
            while _words(store, "六合彩") != ["六合彩"]:
                await asyncio.sleep(0.01)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    assert reload_threads and loop_thread not in reload_threads
