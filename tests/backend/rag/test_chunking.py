from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

import pytest

from backend.errors import ConfigError
from backend.rag.chunking import Chunker, estimate_tokens, split_sentences
from backend.rag.document import Block, Chunk, DocumentFormat, ParsedDocument

Counter = Callable[[str], int]

SENTENCE_ENDS = "。！？；”"
CLAUSES = (
    "本制度适用于公司全体员工",
    "申请人应当在规定期限内提交书面材料",
    "财务部门负责审核报销单据的真实性",
    "如有疑问请联系人力资源部",
    "系统每天凌晨自动备份数据库",
    "用户忘记密码时可以通过手机验证码重置",
    "年假天数根据工龄计算",
    "会议纪要须在三个工作日内归档",
)


def make_document(paragraphs: Sequence[tuple[str, int | None, str | None]]) -> ParsedDocument:
    """A document of (text, page, heading) blocks with their offsets in the extracted text."""
    blocks: list[Block] = []
    offset = 0
    for text, page, heading in paragraphs:
        blocks.append(Block(text=text, offset=offset, page=page, heading=heading))
        offset += len(text) + 1
    return ParsedDocument(format=DocumentFormat.PDF, blocks=tuple(blocks))


def chinese_sentence(rng: random.Random) -> str:
    body = rng.choice(CLAUSES) + rng.choice(["", "", "，特此通知", "，详见附件"])
    ending = rng.choice(["。", "！", "？", "；", "。”"])
    return ("他说：“" + body if ending == "。”" else body) + ending


@pytest.fixture(scope="module")
def long_chinese() -> ParsedDocument:
    """Three chapters of two sections each, twelve paragraphs per section, pages of five blocks."""
    rng = random.Random(7)
    paragraphs: list[tuple[str, int | None, str | None]] = []
    for chapter in range(1, 4):
        for section in range(1, 3):
            heading = f"第{chapter}章 总则 > 第{section}节"
            for _ in range(12):
                text = "".join(chinese_sentence(rng) for _ in range(rng.randint(2, 6)))
                paragraphs.append((text, len(paragraphs) // 5 + 1, heading))
    return make_document(paragraphs)


@pytest.fixture(params=["estimate", "minilm"])
def counter(request: pytest.FixtureRequest) -> Counter:
    if request.param == "estimate":
        return estimate_tokens
    embedder = request.getfixturevalue("embedder")
    count: Counter = embedder.count_tokens
    return count


def blocks_under(document: ParsedDocument, chunk: Chunk) -> list[Block]:
    return [
        b
        for b in document.blocks
        if b.offset < chunk.char_end and chunk.char_start < b.offset + len(b.text)
    ]


def test_closing_quotes_stay_with_their_sentence() -> None:
    text = "他说：“今天下雨了。”然后走了！「真的吗？」是的……好吧"
    assert [text[s:e] for s, e in split_sentences(text)] == [
        "他说：“今天下雨了。”",
        "然后走了！",
        "「真的吗？」",
        "是的……",
        "好吧",
    ]


def test_english_periods_need_a_space_after() -> None:
    text = "It costs 3.14 dollars. See v1.2 now! Done?\nNext line"
    assert [text[s:e] for s, e in split_sentences(text)] == [
        "It costs 3.14 dollars.",
        "See v1.2 now!",
        "Done?",
        "Next line",
    ]


def test_estimate_counts_cjk_per_character() -> None:
    assert estimate_tokens("知识库") == 3
    assert estimate_tokens("abcdefgh") == 2
    assert estimate_tokens("知识 base") == 4
    assert estimate_tokens("") == 1


def test_chunks_respect_the_budget(long_chinese: ParsedDocument, counter: Counter) -> None:
    chunks = Chunker(counter, chunk_tokens=120, overlap_tokens=20).split(long_chinese)
    assert len(chunks) > 6
    assert all(c.tokens == counter(c.text) <= 120 for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_offsets_are_exact(long_chinese: ParsedDocument) -> None:
    chunks = Chunker(estimate_tokens, chunk_tokens=120, overlap_tokens=20).split(long_chinese)
    text = long_chinese.text
    assert all(text[c.char_start : c.char_end] == c.text for c in chunks)
    assert chunks[0].char_start == 0
    assert chunks[-1].char_end == len(text.rstrip())


def test_chunks_start_at_sentence_starts(long_chinese: ParsedDocument) -> None:
    chunks = Chunker(estimate_tokens, chunk_tokens=120, overlap_tokens=20).split(long_chinese)
    text = long_chinese.text
    for chunk in chunks[1:]:
        before = text[: chunk.char_start]
        assert before.endswith("\n") or before[-1] in SENTENCE_ENDS, chunk.text[:20]
        assert chunk.text[-1] in SENTENCE_ENDS


def test_neighbours_overlap_by_whole_sentences(long_chinese: ParsedDocument) -> None:
    chunks = Chunker(estimate_tokens, chunk_tokens=120, overlap_tokens=20).split(long_chinese)
    pairs = [(a, b) for a, b in itertools.pairwise(chunks) if a.heading == b.heading]
    assert pairs
    for before, after in pairs:
        assert before.char_start < after.char_start < before.char_end < after.char_end
        shared = long_chinese.text[after.char_start : before.char_end]
        assert shared.rstrip()[-1] in SENTENCE_ENDS
        assert estimate_tokens(shared) < 40


def test_headings_are_carried_and_never_crossed(long_chinese: ParsedDocument) -> None:
    chunks = Chunker(estimate_tokens, chunk_tokens=120, overlap_tokens=20).split(long_chinese)
    for chunk in chunks:
        assert {b.heading for b in blocks_under(long_chinese, chunk)} == {chunk.heading}
    firsts = {b.heading: b.offset for b in reversed(long_chinese.blocks)}
    starts = {c.char_start for c in chunks}
    assert set(firsts.values()) <= starts
    assert len({c.heading for c in chunks}) == 6


def test_page_ranges_follow_the_blocks(long_chinese: ParsedDocument) -> None:
    chunks = Chunker(estimate_tokens, chunk_tokens=120, overlap_tokens=20).split(long_chinese)
    assert any(c.page_start != c.page_end for c in chunks)
    for chunk in chunks:
        pages = [b.page for b in blocks_under(long_chinese, chunk) if b.page is not None]
        assert (chunk.page_start, chunk.page_end) == (min(pages), max(pages))


def test_pages_unknown_stay_none() -> None:
    document = make_document([("没有页码的段落。", None, None)])
    (chunk,) = Chunker(estimate_tokens, chunk_tokens=50, overlap_tokens=5).split(document)
    assert (chunk.page_start, chunk.page_end, chunk.heading) == (None, None, None)


def test_small_sections_are_not_merged() -> None:
    document = make_document([("第一节的内容。", 1, "甲"), ("第二节的内容。", 1, "乙")])
    chunks = Chunker(estimate_tokens, chunk_tokens=400, overlap_tokens=60).split(document)
    assert [(c.heading, c.text) for c in chunks] == [
        ("甲", "第一节的内容。"),
        ("乙", "第二节的内容。"),
    ]


def test_long_sentence_is_hard_split(counter: Counter) -> None:
    rng = random.Random(3)
    sentence = "".join(
        rng.choice("的一是在不了有和人这中大为上个国我以要他时来用们生到作") for _ in range(5000)
    )
    document = make_document([("前言。", 1, None), (sentence, 2, None), ("结尾。", 3, None)])
    chunks = Chunker(counter, chunk_tokens=120, overlap_tokens=20).split(document)
    start = document.blocks[1].offset
    covered = set[int]()
    for chunk in chunks:
        assert chunk.tokens <= 120
        assert document.text[chunk.char_start : chunk.char_end] == chunk.text
        covered.update(range(chunk.char_start, chunk.char_end))
    assert covered >= set(range(start, start + len(sentence)))
    assert len(chunks) >= math.ceil(counter(sentence) / 120)


def test_long_english_run_is_cut_between_words(counter: Counter) -> None:
    words = " ".join(f"word{i % 97}" for i in range(3000))
    chunks = Chunker(counter, chunk_tokens=120, overlap_tokens=20).split(
        make_document([(words, None, None)])
    )
    assert len(chunks) > 1
    assert all(c.tokens <= 120 for c in chunks)
    assert all(c.text.split()[0].startswith("word") and c.text[-1].isdigit() for c in chunks)


def test_blank_blocks_are_skipped() -> None:
    document = make_document(
        [("", 1, None), ("   ", 1, None), ("正文。", 2, None), ("\t", 3, None)]
    )
    chunks = Chunker(estimate_tokens, chunk_tokens=50, overlap_tokens=5).split(document)
    assert [(c.text, c.char_start, c.page_start, c.page_end) for c in chunks] == [
        ("正文。", 5, 2, 2)
    ]
    assert (
        Chunker(estimate_tokens, chunk_tokens=50, overlap_tokens=5).split(make_document([])) == []
    )


def test_split_is_deterministic(long_chinese: ParsedDocument) -> None:
    first = Chunker(estimate_tokens, chunk_tokens=120, overlap_tokens=20).split(long_chinese)
    second = Chunker(estimate_tokens, chunk_tokens=120, overlap_tokens=20).split(long_chinese)
    assert first == second


def test_embedding_text_puts_the_heading_first() -> None:
    chunker = Chunker(estimate_tokens, chunk_tokens=50, overlap_tokens=5)
    (with_heading,) = chunker.split(make_document([("正文。", None, "第一章 > 第二条")]))
    (without,) = chunker.split(make_document([("正文。", None, None)]))
    assert chunker.embedding_text(with_heading) == "第一章 > 第二条\n正文。"
    assert chunker.embedding_text(without) == "正文。"


def test_overlap_must_be_smaller_than_the_chunk() -> None:
    with pytest.raises(ConfigError, match="QWEN_RAG__CHUNK_OVERLAP_TOKENS"):
        Chunker(estimate_tokens, chunk_tokens=50, overlap_tokens=50)


def test_offsets_follow_the_text_when_block_offsets_are_wrong() -> None:
    blocks = (Block("第一段。", 0), Block("第二段。", 0), Block("第三段。", 99))
    document = ParsedDocument(format=DocumentFormat.TXT, blocks=blocks)
    chunks = Chunker(estimate_tokens, chunk_tokens=4, overlap_tokens=0).split(document)
    assert [(c.text, document.text[c.char_start : c.char_end]) for c in chunks] == [
        ("第一段。", "第一段。"),
        ("第二段。", "第二段。"),
        ("第三段。", "第三段。"),
    ]
