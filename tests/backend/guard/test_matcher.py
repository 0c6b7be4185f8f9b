"""Matching: the evasion corpus over every sample lexicon word, the benign corpus, and each rule."""

from __future__ import annotations

import opencc
import pytest

from backend.errors import LexiconError
from backend.guard import Action, Lexicon, Matcher, Segmenter, Severity
from backend.guard.lexicon import Entry
from backend.guard.lexicon import builtin_lexicon_dir as _builtin
from backend.guard.matcher import MAX_GAP, stretch

_S2T = opencc.OpenCC("s2t")
_WORDS = [entry.word for entry in Lexicon.load(_builtin()).entries]


def _full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _alternate_case(text: str) -> str:
    return "".join(c.upper() if i % 2 == 0 else c for i, c in enumerate(text))


EVASIONS = {
    "plain": lambda w: w,
    "full_width": _full_width,
    "traditional": lambda w: _S2T.convert(w),
    "spaced": lambda w: " ".join(w),
    "ideographic_spaced": lambda w: "\u3000".join(w),
    "brackets": lambda w: "【】".join(w),
    "stars": lambda w: "*".join(w),
    "dots": lambda w: "·".join(w),
    "emoji": lambda w: "😀".join(w),
    "max_gap": lambda w: ("-" * MAX_GAP).join(w),
    "zero_width": lambda w: "\u200b".join(w),
    "zero_width_joiners": lambda w: "\u200d\ufeff".join(w),
    "upper": str.upper,
    "alternate_case": _alternate_case,
    "traditional_full_width_symbols": lambda w: "＊".join(_full_width(_S2T.convert(w))),
    "upper_full_width_spaced": lambda w: " ".join(_full_width(w.upper())),
}


@pytest.mark.parametrize("evasion", sorted(EVASIONS))
@pytest.mark.parametrize("word", _WORDS)
def test_evasion_is_detected(matcher: Matcher, word: str, evasion: str) -> None:
    variant = EVASIONS[evasion](word)
    text = f"你好，{variant}，谢谢"
    spans = [hit.span for hit in matcher.check(text).hits if hit.word == word]
    assert [text[start:end] for start, end in spans] == [variant]


BENIGN = [
    "我用微信支付买了一杯咖啡。",
    "请关注我们的微信公众号，获取最新消息。",
    "这个微信小程序很好用。",
    "《枪支管理法》对持枪有严格规定。",
    "银行正在加强反洗钱工作。",
    "他因赌博罪被判处有期徒刑。",
    "这个问题有点大麻烦，我们明天再谈。",
    "请把发票寄到公司前台。",
    "公司可以为您开具增值税专用发票。",
    "我在学习 VxWorks 实时操作系统。",
    "今天天气很好，我们去公园散步吧。",
    "他的QQ音乐会员已经过期了。",
    "冰箱里还有一些冰块和水果。",
    "这本书讲的是明朝的历史。",
    "请在周五之前提交季度报告。",
    "孩子们在操场上踢足球。",
    "我们的产品支持多种支付方式。",
    "地铁站离这里只有五百米。",
    "他从不赌，博士毕业后去了银行。",  # 赌 + 博 across a clause break
    "今年的枪\n支出比去年少。",
]


@pytest.mark.parametrize("sentence", BENIGN)
def test_benign_sentence_is_clean(matcher: Matcher, sentence: str) -> None:
    assert matcher.check(sentence).hits == ()


def _matcher(segmenter: Segmenter, *entries: Entry, allow: tuple[str, ...] = ()) -> Matcher:
    return Matcher(Lexicon(entries, allow), segmenter=segmenter)


def test_gap_beyond_bound_is_no_match(matcher: Matcher) -> None:
    assert matcher.check("微" + "-" * (MAX_GAP + 1) + "信").hits == ()


def test_clause_break_separates_words(matcher: Matcher) -> None:
    assert matcher.check("加微，信").hits == ()


def test_whole_word_entry_needs_word_boundaries(matcher: Matcher) -> None:
    assert [hit.word for hit in matcher.check("他因吸大麻被抓。").hits] == ["大麻"]
    assert matcher.check("这下可有大麻烦了。").hits == ()


def test_ascii_word_glued_to_letters_is_no_match(matcher: Matcher) -> None:
    assert matcher.check("reviewx vxworks").hits == ()


def test_ascii_word_followed_by_digits_matches(matcher: Matcher) -> None:
    assert [hit.word for hit in matcher.check("vx123456").hits] == ["vx"]


def test_allow_list_needs_the_whole_superstring(matcher: Matcher) -> None:
    words = [hit.word for hit in matcher.check("加微信支付").hits]
    assert words == ["加微信"]


def test_strictest_severity_decides(matcher: Matcher) -> None:
    verdict = matcher.check("请加微信")
    assert verdict.action is Action.BLOCK
    assert verdict.blocked
    assert {hit.severity for hit in verdict.hits} == {Severity.BLOCK, Severity.FLAG}


def test_flag_only_is_not_blocked(matcher: Matcher) -> None:
    verdict = matcher.check("他喜欢赌博")
    assert (verdict.action, verdict.blocked) == (Action.FLAG, False)


def test_clean_text(matcher: Matcher) -> None:
    assert matcher.check("").action is Action.NONE


def test_mask_replaces_each_original_character(matcher: Matcher) -> None:
    assert matcher.mask("联系ＶＸ：abc，一【】夜情") == "联系＊＊：abc，＊＊＊＊＊"


def test_mask_keeps_block_and_flag_words(matcher: Matcher) -> None:
    assert matcher.mask("请加微信") == "请加微信"


def test_same_word_in_two_entries_reports_both(segmenter: Segmenter) -> None:
    matcher = _matcher(
        segmenter, Entry("赌博", "赌博", Severity.FLAG), Entry("賭博", "其他", Severity.MASK)
    )
    assert sorted(hit.category for hit in matcher.check("赌博").hits) == ["其他", "赌博"]


def test_allow_entry_equal_to_word_drops_it(segmenter: Segmenter) -> None:
    matcher = _matcher(segmenter, Entry("微信", "广告", Severity.FLAG), allow=("微信",))
    assert matcher.check("微信").hits == ()


def test_hold_covers_longest_allow_entry_around_a_streamed_word(matcher: Matcher) -> None:
    assert matcher.hold_chars == stretch(len("枪支管理法")) + 1


def test_hold_ignores_flag_words(segmenter: Segmenter) -> None:
    matcher = _matcher(
        segmenter, Entry("一二三四五六", "x", Severity.FLAG), Entry("七八", "x", Severity.BLOCK)
    )
    assert matcher.hold_chars == stretch(2) + 1


def test_word_without_letters_is_refused(segmenter: Segmenter) -> None:
    with pytest.raises(LexiconError):
        _matcher(segmenter, Entry("【】", "x", Severity.BLOCK))


def test_span_after_characters_beyond_the_bmp(matcher: Matcher) -> None:
    text = "𠀀𠀁好，加微😀信𠀂"
    spans = [hit.span for hit in matcher.check(text).hits if hit.word == "加微信"]
    assert [text[start:end] for start, end in spans] == ["加微😀信"]


def test_key_in_the_middle_of_two_characters_is_no_match(segmenter: Segmenter) -> None:
    # In UTF-16 (little-endian) 䅂䍄䕅 is 42 41 44 43 45 45: from its second byte on, 41 44 43 45
    # spells 䑁䕃, which the finder reports; it must not become a hit.
    matcher = _matcher(segmenter, Entry("\u4441\u4543", "x", Severity.BLOCK))
    assert matcher.check("\u4142\u4344\u4545").hits == ()
