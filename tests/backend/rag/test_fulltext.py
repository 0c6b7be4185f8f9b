"""FullText: jieba segmentation of chunk text for the index and of questions into search terms."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from backend.rag.fulltext import FullText


@pytest.fixture(scope="module")
def fulltext(tmp_path_factory: pytest.TempPathFactory) -> FullText:
    return FullText.create(cache_dir=tmp_path_factory.mktemp("jieba"))


class _SpaceSegmenter:
    """Has only `cut`, like a segmenter without jieba's search mode."""

    def cut(self, sentence: str) -> Iterable[str]:
        return sentence.split(" ")


def test_index_text_separates_chinese_words(fulltext: FullText) -> None:
    assert fulltext.index_text("公司的报销流程") == "公司 的 报销 流程"


def test_index_text_adds_words_inside_long_words(fulltext: FullText) -> None:
    assert fulltext.index_text("差旅费").split() == ["差旅", "旅费", "差旅费"]


def test_index_text_drops_punctuation_and_spaces(fulltext: FullText) -> None:
    assert fulltext.index_text("报销，流程！ \n（说明）") == "报销 流程 说明"


def test_index_text_folds_width_and_case(fulltext: FullText) -> None:
    assert fulltext.index_text("ＰＤＦ Report") == "pdf report"


def test_index_text_keeps_numbers(fulltext: FullText) -> None:
    assert "30" in fulltext.index_text("30日内提交").split()


def test_query_terms_drop_stopwords(fulltext: FullText) -> None:
    assert fulltext.query_terms("如何报销差旅费？") == ["报销", "差旅", "旅费", "差旅费"]


def test_query_terms_drop_english_stopwords(fulltext: FullText) -> None:
    assert fulltext.query_terms("What is the refund policy?") == ["refund", "policy"]


def test_query_terms_are_distinct_in_order(fulltext: FullText) -> None:
    assert fulltext.query_terms("报销 发票 报销") == ["报销", "发票"]


def test_query_of_only_stopwords_is_empty(fulltext: FullText) -> None:
    assert fulltext.query_terms("是什么呢？！") == []


def test_query_terms_match_index_words(fulltext: FullText) -> None:
    indexed = set(
        fulltext.index_text("员工每年可享受5天带薪年假，年假申请需提前一周提交。").split()
    )
    assert set(fulltext.query_terms("年假怎么申请")) <= indexed


def test_segmenter_without_search_mode() -> None:
    fulltext = FullText(_SpaceSegmenter())
    assert fulltext.query_terms("Refund , policy") == ["refund", "policy"]
