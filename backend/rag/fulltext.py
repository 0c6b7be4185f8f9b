"""Word segmentation for PostgreSQL full-text search of Chinese (and mixed) text.

`to_tsvector('simple', ...)` keeps a whole run of Chinese characters as one token, so a keyword
inside it never matches. Chunks are therefore stored with a jieba-segmented copy of their text
(`search_text`, words joined by spaces) that the `tsv` column is computed from, and queries are
cut the same way.

Both sides normalise with NFKC (full-width letters and digits become ASCII) and lowercase, and
use jieba's search mode, which adds the dictionary words inside a long word (中华人民共和国 also
yields 中华, 人民, 共和国), so a query word matches inside a longer indexed word and vice versa.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from backend.guard.segment import Segmenter, jieba_segmenter

# Function words and question words that carry no topic (a query is usually a question).
_STOPWORDS = (
    "的 地 得 了 着 过 是 吗 呢 吧 啊 呀 么 嘛 哦 和 与 及 或 而 在 有 也 都 就 还 又 把 被 对 从 向 给"
    " 我 你 您 他 她 它 我们 你们 他们 这 那 这个 那个 这些 那些 哪 哪个 哪些 什么 怎么 怎样 怎么样"
    " 如何 为什么 为何 多少 几 谁 请问 请 一下 一个 可以 能 能否 是否 需要 应该"
    " a an the is are was were be been am do does did of to in on at by for with from and or"
    " what how why which who whom when where can could should would will i you we it this that"
    " please tell me about"
)
STOPWORDS = frozenset(_STOPWORDS.split())


@runtime_checkable
class SearchSegmenter(Segmenter, Protocol):
    """A segmenter with jieba's search mode (jieba's `Tokenizer` fits)."""

    def cut_for_search(self, sentence: str) -> Iterable[str]: ...


class FullText:
    """Turns chunk text into `search_text` and questions into search terms.

    `segmenter`: from backend.guard.segment.jieba_segmenter; its search mode is used when it has
    one (jieba's does), else its plain `cut`. Thread-safe as the segmenter is; the first call may
    take ~1 s while jieba loads its dictionary, so async callers run it in a thread.
    """

    def __init__(self, segmenter: Segmenter, *, stopwords: frozenset[str] = STOPWORDS) -> None:
        self._cut = (
            segmenter.cut_for_search if isinstance(segmenter, SearchSegmenter) else segmenter.cut
        )
        self._stopwords = stopwords

    @classmethod
    def create(cls, *, cache_dir: Path | None) -> FullText:
        """With a jieba segmenter keeping its dictionary cache in `cache_dir` (created if missing;
        None: the system temp dir). The dictionary loads on first use, not here."""
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
        return cls(jieba_segmenter(cache_dir=cache_dir))

    def index_text(self, text: str) -> str:
        """The words of `text`, lowercased, without punctuation or whitespace, joined by spaces."""
        return " ".join(self._words(text))

    def query_terms(self, query: str) -> list[str]:
        """The distinct words of `query` in order of appearance, without stopwords or
        punctuation; [] for a query of nothing else."""
        seen: dict[str, None] = {}
        for word in self._words(query):
            if word not in self._stopwords:
                seen.setdefault(word)
        return list(seen)

    def _words(self, text: str) -> list[str]:
        normalized = unicodedata.normalize("NFKC", text).lower()
        return [word for word in (w.strip() for w in self._cut(normalized)) if _is_word(word)]


def _is_word(token: str) -> bool:
    """At least one letter or digit (drops punctuation, symbols, whitespace, emoji)."""
    return any(char.isalnum() for char in token)
