"""The jieba segmenter keeps its cache where it is told."""

from __future__ import annotations

from pathlib import Path

from backend.guard import jieba_segmenter


def test_cache_goes_to_cache_dir(tmp_path: Path) -> None:
    segmenter = jieba_segmenter(cache_dir=tmp_path)
    assert list(segmenter.cut("我们去公园")) == ["我们", "去", "公园"]
    assert list(tmp_path.glob("jieba*.cache"))
