"""Parsing in-process: detection by content, every format's blocks, and every refusal."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from backend.errors import DocumentRejected, RejectReason
from backend.rag.document import DocumentFormat, ParsedDocument
from backend.rag.parsing import MAX_ZIP_ENTRIES, decode_text, detect_format, parse_bytes
from tests.fixtures.documents import (
    TEXT_ZH,
    Heading,
    Para,
    make_docx,
    make_elf,
    make_encrypted_office,
    make_encrypted_pdf,
    make_entities_docx,
    make_entities_html,
    make_garbage_pdf,
    make_html,
    make_large_text,
    make_many_entries_docx,
    make_markdown,
    make_pdf,
    make_plain_zip,
    make_png,
    make_truncated_pdf,
    make_txt,
    make_zip_bomb_docx,
)

MAX = 1_000_000


def parse(data: bytes) -> ParsedDocument:
    return parse_bytes(data, max_chars=MAX)


def rejection(data: bytes) -> RejectReason:
    with pytest.raises(DocumentRejected) as caught:
        parse(data)
    return caught.value.reason


def by_text(document: ParsedDocument) -> dict[str, str | None]:
    return {block.text: block.heading for block in document.blocks}


SAMPLES: dict[str, tuple[Callable[[], bytes], DocumentFormat]] = {
    "pdf": (make_pdf, DocumentFormat.PDF),
    "docx": (make_docx, DocumentFormat.DOCX),
    "html": (make_html, DocumentFormat.HTML),
    "markdown": (make_markdown, DocumentFormat.MARKDOWN),
    "utf8": (make_txt, DocumentFormat.TXT),
    "utf8-bom": (lambda: make_txt(encoding="utf-8-sig"), DocumentFormat.TXT),
    "gb18030": (lambda: make_txt(encoding="gb18030"), DocumentFormat.TXT),
    "utf16": (lambda: make_txt(encoding="utf-16"), DocumentFormat.TXT),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_detects_by_content(name: str) -> None:
    build, expected = SAMPLES[name]
    assert detect_format(build()) is expected


@pytest.mark.parametrize("name", SAMPLES)
def test_offsets_index_the_text(name: str) -> None:
    document = parse(SAMPLES[name][0]())
    assert document.format is SAMPLES[name][1]
    assert document.blocks
    for block in document.blocks:
        assert block.text and block.text == block.text.strip("\n")
        assert document.text[block.offset : block.offset + len(block.text)] == block.text
        assert document.text[block.offset + len(block.text)] == "\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", RejectReason.EMPTY),
        (make_elf(), RejectReason.UNSUPPORTED_TYPE),
        (make_png(), RejectReason.UNSUPPORTED_TYPE),
        (make_plain_zip(), RejectReason.UNSUPPORTED_TYPE),
        (b"text with a \x00 NUL byte", RejectReason.UNSUPPORTED_TYPE),
        (bytes(range(128, 256)) * 8, RejectReason.UNSUPPORTED_TYPE),
        (b"\x01\x02\x03\x04\x05 control soup \x06\x07\x08", RejectReason.UNSUPPORTED_TYPE),
        (make_encrypted_office(), RejectReason.ENCRYPTED),
        (make_docx()[:-200], RejectReason.MALFORMED),
    ],
    ids=["empty", "elf", "png", "zip", "nul", "undecodable", "controls", "office", "cut-zip"],
)
def test_detect_refuses(data: bytes, reason: RejectReason) -> None:
    with pytest.raises(DocumentRejected) as caught:
        detect_format(data)
    assert caught.value.reason is reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\ufeff  \n<!DOCTYPE HTML><title>x</title><p>y</p>", DocumentFormat.HTML),
        ("<html><body>正文</body></html>", DocumentFormat.HTML),
        ("<div><p>片段</p></div>", DocumentFormat.HTML),
        ('<p align="center"><img src="logo.png"></p>\n\n# 项目\n\n说明', DocumentFormat.MARKDOWN),
        ("说明：\n- 第一项\n- 第二项\n", DocumentFormat.MARKDOWN),
        ("```\ncode\n```\n", DocumentFormat.MARKDOWN),
        ("#话题 不是标题\n普通文本 1 < 2。\n", DocumentFormat.TXT),
    ],
)
def test_text_formats(text: str, expected: DocumentFormat) -> None:
    assert detect_format(text.encode()) is expected


def test_pdf_named_anything_is_a_pdf() -> None:
    assert detect_format(make_pdf()) is DocumentFormat.PDF


def test_pdf_pages() -> None:
    document = parse(make_pdf(title="Fruit"))
    assert document.title == "Fruit"
    assert [block.page for block in document.blocks] == [1, 2]
    assert "apples" in document.blocks[0].text
    assert "pears" in document.blocks[1].text


def test_pdf_many_pages_keep_their_numbers() -> None:
    pages = [[f"Page {n} says hello."] for n in range(1, 6)]
    document = parse(make_pdf(pages))
    assert [(block.page, block.text) for block in document.blocks] == [
        (n, f"Page {n} says hello.") for n in range(1, 6)
    ]


def test_pdf_needing_a_password_is_encrypted() -> None:
    assert rejection(make_encrypted_pdf()) is RejectReason.ENCRYPTED


def test_pdf_with_empty_user_password_is_read() -> None:
    document = parse(make_encrypted_pdf(user_password=""))
    assert [block.page for block in document.blocks] == [1, 2]


@pytest.mark.parametrize("build", [make_truncated_pdf, make_garbage_pdf], ids=["cut", "garbage"])
def test_broken_pdf_is_malformed(build: Callable[[], bytes]) -> None:
    assert rejection(build()) is RejectReason.MALFORMED


def test_pdf_without_text() -> None:
    assert rejection(make_pdf([[], []])) is RejectReason.NO_TEXT


def test_docx_heading_path_and_table() -> None:
    document = parse(make_docx())
    headings = by_text(document)
    assert headings["一、总则"] == "一、总则"
    assert headings["为了规范知识库的使用，制定本办法。"] == "一、总则 > 第一条"
    assert headings["本办法适用于全体员工。"] == "一、总则 > 第二条"
    assert headings["张三 | 研发部"] == "一、总则 > 第二条"
    assert headings["本办法自发布之日起施行。"] == "二、附则"
    assert [block.text for block in document.blocks][5:7] == ["姓名 | 部门", "张三 | 研发部"]


def test_docx_chinese_heading_styles() -> None:
    parts: list[Heading | Para] = [Heading(1, "第一章"), Heading(2, "第一节"), Para("内容。")]
    document = parse(make_docx(parts, heading_style="标题 {level}"))
    assert by_text(document)["内容。"] == "第一章 > 第一节"


def test_docx_title_from_properties() -> None:
    assert parse(make_docx(title="员工手册")).title == "员工手册"


def test_docx_zip_bomb() -> None:
    assert rejection(make_zip_bomb_docx()) is RejectReason.ARCHIVE_BOMB


def test_docx_with_too_many_entries() -> None:
    assert rejection(make_many_entries_docx(entries=MAX_ZIP_ENTRIES)) is RejectReason.ARCHIVE_BOMB


@pytest.mark.parametrize(
    ("part", "encoding"),
    [
        ("word/document.xml", "utf-8"),
        ("word/document.xml", "utf-16"),
        ("[Content_Types].xml", "utf-8"),
        ("word/styles.xml", "utf-32"),
    ],
)
def test_docx_entities(part: str, encoding: str) -> None:
    assert rejection(make_entities_docx(part=part, encoding=encoding)) is RejectReason.XML_ENTITIES


def test_html_structure() -> None:
    document = parse(make_html())
    assert document.title == "测试页面"
    headings = by_text(document)
    assert headings["这是第一段，含有换行。"] == "公司制度"
    assert headings["每天九点上班。\n下午六点下班。"] == "公司制度 > 考勤"
    assert headings["事假"] == "公司制度 > 考勤 > 请假"
    assert headings["报销&审批 <流程>。"] == "公司制度 > 报销"


def test_html_drops_scripts_styles_and_navigation() -> None:
    text = parse(make_html()).text
    for hidden in ("var x", "color: red", "不应出现", "首页", "测试页面"):
        assert hidden not in text


def test_html_in_gb18030() -> None:
    data = make_html().replace(b'charset="utf-8"', b'charset="gbk"').decode().encode("gb18030")
    assert by_text(parse(data))["事假"] == "公司制度 > 考勤 > 请假"


def test_html_entities_are_refused() -> None:
    assert rejection(make_entities_html()) is RejectReason.XML_ENTITIES


def nested(depth: int) -> bytes:
    return b"<html><body>" + b"<div>" * depth + b"deep" + b"</div>" * depth + b"</body></html>"


def test_html_nesting() -> None:
    assert [block.text for block in parse(nested(200)).blocks] == ["deep"]


def test_html_nesting_beyond_the_parser_limit() -> None:
    assert rejection(nested(5000)) is RejectReason.MALFORMED


def test_markdown_headings_and_fences() -> None:
    document = parse(make_markdown())
    assert document.title == "员工手册"
    headings = by_text(document)
    assert headings["每天九点上班。\n中午休息一小时。"] == "员工手册 > 一、总则 > 第一条"
    assert headings["- 遵守纪律；\n- 保守秘密。"] == "员工手册 > 一、总则 > 第二条"
    fence = next(block for block in document.blocks if block.text.startswith("```"))
    assert "# 这不是标题\n\nprint" in fence.text
    assert fence.heading == "员工手册 > 二、代码"
    assert headings["结束。"] == "员工手册 > 二、代码"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gb18030"])
def test_text_paragraphs(encoding: str) -> None:
    document = parse(make_txt(encoding=encoding))
    assert [block.text for block in document.blocks] == [
        "第一段：这是一个中文文本文件。\n第二行仍属第一段。",
        "第二段：标点符号，“引号”和《书名号》保留。",
    ]
    assert all(block.heading is None and block.page is None for block in document.blocks)


def test_text_is_normalized() -> None:
    data = "甲  \r\n乙\t \r\n\r\n\r\n\r\n丙\x07丁\x1a".encode()
    assert parse(data).text == "甲\n乙\n丙丁\n"


def test_decode_prefers_utf8_then_gb18030() -> None:
    assert decode_text(TEXT_ZH.encode("gb18030")) == TEXT_ZH
    assert decode_text("ĀĀ".encode()) == "ĀĀ"


def test_whitespace_only_has_no_text() -> None:
    assert rejection(b" \n\n\t \n") is RejectReason.NO_TEXT


def test_truncates_at_max_chars() -> None:
    data = make_large_text(1)
    full = parse(data)
    cut = parse_bytes(data, max_chars=1000)
    assert len(full.text) > 1000 >= len(cut.text)
    assert full.text.startswith(cut.text[:-1])
    assert len(parse_bytes(b"abcdef", max_chars=4).text) == 4


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_chars"):
        parse_bytes(b"x", max_chars=0)
