"""Guard fixtures: one jieba segmenter (its dictionary loads once) and the sample lexicon."""

from __future__ import annotations

import pytest

from backend.guard import Lexicon, Matcher, Segmenter, builtin_lexicon_dir, jieba_segmenter


@pytest.fixture(scope="session")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    return jieba_segmenter(cache_dir=tmp_path_factory.mktemp("jieba"))


@pytest.fixture(scope="session")
def sample_lexicon() -> Lexicon:
    return Lexicon.load(builtin_lexicon_dir())


@pytest.fixture(scope="session")
def matcher(sample_lexicon: Lexicon, segmenter: Segmenter) -> Matcher:
    return Matcher(sample_lexicon, segmenter=segmenter)
