"""Word segmentation, used only where word boundaries decide a match (`word` lexicon entries)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import jieba


class Segmenter(Protocol):
    """Cuts a sentence into words (jieba's `Tokenizer` fits)."""

    def cut(self, sentence: str) -> Iterable[str]: ...


def jieba_segmenter(*, cache_dir: Path | None) -> Segmenter:
    """A jieba tokenizer that keeps its dictionary cache in `cache_dir` (None: the system temp
    dir). Its dictionary loads on first use (~1 s, thread-safe), not here. Also quiets jieba's
    own logger, which otherwise prints its loading messages to stderr."""
    tokenizer = jieba.Tokenizer()
    if cache_dir is not None:
        tokenizer.tmp_dir = str(cache_dir)
    logging.getLogger("jieba").setLevel(logging.WARNING)
    return tokenizer  # type: ignore[no-any-return]
