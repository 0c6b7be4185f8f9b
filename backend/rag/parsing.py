"""Turn an uploaded file's bytes into a ParsedDocument: format detection, then one parser per format.

The format is decided by content, never by name or MIME type (`detect_format`, which needs the
whole file: a DOCX is told from other zips by its central directory, at the end). Everything here
is pure and in-process: functions read only the bytes they are given (no paths, no network, no
environment) and raise only `DocumentRejected` for bad input; MemoryError and RecursionError pass
through. Run untrusted files through `backend.rag.sandbox`, which bounds CPU, memory and time. The
third-party parsers are imported inside the function that uses them, so a sandbox child parsing a
text file starts without loading pypdf, python-docx or lxml.

Blocks come in reading order; `offset` indexes `ParsedDocument.text` (each block followed by one
"\\n"); `heading` is the heading path ("一、总则 > 第二条", at most 6 levels of 200 characters); a
heading is itself a block whose path ends with it. Text is normalized lightly: line ends unified,
trailing spaces stripped, control characters and lone surrogates dropped, more than one blank line
collapsed; text formats split into paragraphs on blank lines, DOCX gives one block per paragraph and
per table row ("cell | cell"), PDF one or more blocks per page. The total text is cut at `max_chars`.

Checks before parsing (`backend.rag.detection`): a DOCX zip with more than `MAX_ZIP_ENTRIES` entries, more than
`MAX_UNCOMPRESSED` bytes uncompressed, or a ratio above `MAX_RATIO`:1 once past `RATIO_FLOOR` bytes
is an ARCHIVE_BOMB; any entry containing `<!DOCTYPE` or `<!ENTITY` (UTF-8, UTF-16 or UTF-32) is
XML_ENTITIES, and so is HTML declaring `<!ENTITY`. A PDF that opens with the empty password (owner
password only: it opens in any viewer without a prompt) is read; one that needs a password is
ENCRYPTED, and so is an Office file encrypted with a password (an OLE container, not a zip).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

from backend.errors import DocumentRejected, RejectReason
from backend.rag.detection import (
    CONTROL_CHARS,
    MAX_RATIO,
    MAX_UNCOMPRESSED,
    MAX_ZIP_ENTRIES,
    RATIO_FLOOR,
    check_zip,
    decode_text,
    detect_format,
    sniff,
)
from backend.rag.document import Block, DocumentFormat, ParsedDocument

__all__ = [
    "MAX_RATIO",
    "MAX_UNCOMPRESSED",
    "MAX_ZIP_ENTRIES",
    "RATIO_FLOOR",
    "check_zip",
    "decode_text",
    "detect_format",
    "parse_bytes",
]

MAX_HEADING_CHARS = 200
MAX_HEADING_DEPTH = 6

_BLANK_LINE = re.compile(r"\n[ \t\u3000]*\n")
_MANY_BLANKS = re.compile(r"\n{3,}")
_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_MD_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_DOCX_HEADING = re.compile(r"^(?:heading|标题)\s*([1-9])$", re.I)
_CJK = "\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_LINE_BREAK = re.compile(
    f"(?<=[{_CJK}])[ \t]*\n\\s*(?=[{_CJK}])"
)  # source wrapping, not a space
_WHITESPACE = re.compile(r"[ \t\n\r\f\u00a0]+")


def parse_bytes(data: bytes, *, max_chars: int) -> ParsedDocument:
    """Detect the format of `data` and extract its blocks, keeping at most `max_chars` characters
    of text. Raises DocumentRejected for anything that cannot be read; NO_TEXT if nothing is left."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    fmt, text = sniff(data)
    collector = _Collector(max_chars)
    title: str | None = None
    if fmt is DocumentFormat.PDF:
        title = _parse_pdf(data, collector)
    elif fmt is DocumentFormat.DOCX:
        title = _parse_docx(data, collector)
    elif fmt is DocumentFormat.HTML:
        title = _parse_html(text, collector)
    elif fmt is DocumentFormat.MARKDOWN:
        title = _parse_markdown(text, collector)
    else:
        for paragraph in _paragraphs(text):
            collector.add(paragraph)
    if not collector.blocks:
        raise DocumentRejected(RejectReason.NO_TEXT, f"no text in {fmt} file")
    return ParsedDocument(format=fmt, blocks=tuple(collector.blocks), title=title or None)


def _raise_if_out_of_memory(exc: Exception) -> None:
    """libxml2 and zlib report a failed allocation as a parse error: make it a MemoryError."""
    message = f"{exc} {getattr(exc, 'error_log', '')}"
    if any(hint in message for hint in ("NO_MEMORY", "insufficient memory", "allocate memory")):
        raise MemoryError(message[:200]) from exc


def _clean(text: str) -> str:
    text = CONTROL_CHARS.sub("", text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return _MANY_BLANKS.sub("\n\n", text)


def _paragraphs(text: str) -> list[str]:
    return _BLANK_LINE.split(text.replace("\r\n", "\n").replace("\r", "\n"))


class _Collector:
    """Blocks with their offsets, stopping once `max_chars` characters of text are collected."""

    def __init__(self, max_chars: int) -> None:
        self.blocks: list[Block] = []
        self.full = False
        self._max_chars = max_chars
        self._offset = 0
        self._headings: list[tuple[int, str]] = []

    @property
    def heading(self) -> str | None:
        return " > ".join(title for _, title in self._headings) or None

    def enter_heading(self, level: int, title: str, *, page: int | None = None) -> None:
        """Close headings at `level` or deeper, open `title`, and add it as a block."""
        title = _WHITESPACE.sub(" ", _clean(title)).strip()[:MAX_HEADING_CHARS]
        if not title:
            return
        self._headings = [(lvl, t) for lvl, t in self._headings if lvl < level]
        self._headings = [*self._headings, (level, title)][-MAX_HEADING_DEPTH:]
        self.add(title, page=page)

    def add(self, text: str, *, page: int | None = None) -> None:
        text = _clean(text)
        room = self._max_chars - self._offset - 1
        if not text or self.full:
            return
        if len(text) > room:
            self.full = True
            text = text[: max(room, 0)].rstrip()
            if not text:
                return
        self.blocks.append(Block(text, self._offset, page=page, heading=self.heading))
        self._offset += len(text) + 1


def _parse_markdown(text: str, collector: _Collector) -> str | None:
    title: str | None = None
    lines: list[str] = []
    fence: str | None = None

    def flush() -> None:
        collector.add("\n".join(lines))
        lines.clear()

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if fence is not None:
            lines.append(line)
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                flush()
                fence = None
            continue
        if opening := _MD_FENCE.match(line):
            flush()
            fence = opening[1]
            lines.append(line)
        elif heading := _MD_HEADING.match(line):
            flush()
            collector.enter_heading(len(heading[1]), heading[2] or "")
            if title is None and len(heading[1]) == 1 and heading[2]:
                title = heading[2].strip()[:MAX_HEADING_CHARS]
        elif not line.strip():
            flush()
        else:
            lines.append(line)
        if collector.full:
            return title
    flush()
    return title


def _parse_html(text: str, collector: _Collector) -> str | None:
    if re.search(r"<!entity", text, re.I):
        raise DocumentRejected(RejectReason.XML_ENTITIES, "HTML declares an entity")
    from lxml import etree, html  # heavy, and needed for HTML only

    parser = html.HTMLParser(
        no_network=True, remove_comments=True, remove_pis=True, huge_tree=False, recover=True
    )
    text = re.sub(r"^\ufeff?\s*<\?xml[^>]*>", "", text, count=1)
    try:
        root = html.document_fromstring(text, parser=parser)
    except (etree.ParserError, etree.XMLSyntaxError, ValueError) as exc:
        _raise_if_out_of_memory(exc)
        raise DocumentRejected(RejectReason.NO_TEXT, f"no HTML content: {exc}") from exc
    for error in parser.error_log:  # libxml2 stops at a limit (nesting > 255) with a FATAL error
        if error.level_name == "FATAL":
            if error.type_name == "ERR_NO_MEMORY":
                raise MemoryError(error.message)
            raise DocumentRejected(RejectReason.MALFORMED, f"html: {error.message}"[:200])
    title = _WHITESPACE.sub(" ", root.findtext(".//title") or "").strip()[:MAX_HEADING_CHARS]
    _walk_html(root, collector, etree)
    return title or None


# element names, space-separated: dropped with their content, and those that end a block of text
_DROP_NAMES = (
    "head script style noscript template nav svg math iframe object embed canvas select button"
)
_BLOCK_NAMES = (
    "html body p div li ul ol dl dt dd pre blockquote table tr td th thead tbody tfoot caption "
    "section article main header footer aside figure figcaption form fieldset address hr details "
    "summary center"
)
_HTML_DROP = frozenset(_DROP_NAMES.split())
_HTML_BLOCKS = frozenset(_BLOCK_NAMES.split())
_HTML_HEADINGS = {f"h{level}": level for level in range(1, 7)}


def _walk_html(root: Any, collector: _Collector, etree: Any) -> None:
    """Walk the tree without recursion (hostile nesting), collecting inline text between blocks."""
    pieces: list[str] = []
    pre_depth = 0

    def text_of(raw: str) -> str:
        return raw if pre_depth else _WHITESPACE.sub(" ", _CJK_LINE_BREAK.sub("", raw))

    def take() -> str:
        joined = re.sub(r" *\n *", "\n", "".join(pieces)) if not pre_depth else "".join(pieces)
        pieces.clear()
        return joined.strip(" ")

    walker = etree.iterwalk(root, events=("start", "end"))
    for event, element in walker:
        tag = element.tag.lower() if isinstance(element.tag, str) else ""
        if event == "start":
            if tag in _HTML_DROP:
                walker.skip_subtree()
                continue
            if tag == "br":
                pieces.append("\n")
            elif tag in _HTML_BLOCKS or tag in _HTML_HEADINGS:
                collector.add(take())
            pre_depth += tag == "pre"
            if element.text:
                pieces.append(text_of(element.text))
        else:
            if tag in _HTML_HEADINGS:
                collector.enter_heading(_HTML_HEADINGS[tag], take())
            elif tag in _HTML_BLOCKS:
                collector.add(take())
            pre_depth -= tag == "pre"
            if element.tail and element is not root:
                pieces.append(text_of(element.tail))
        if collector.full:
            return
    collector.add(take())


def _parse_docx(data: bytes, collector: _Collector) -> str | None:
    check_zip(data)
    import docx  # heavy, and needed for DOCX only
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(io.BytesIO(data))
        title = document.core_properties.title or None
        for item in document.iter_inner_content():
            if isinstance(item, Paragraph):
                level = _docx_heading_level(item)
                if level is None:
                    collector.add(item.text)
                else:
                    collector.enter_heading(level, item.text)
                    title = title or (item.text.strip()[:MAX_HEADING_CHARS] if level == 1 else None)
            else:
                for row in item.rows:
                    cells: list[Any] = []
                    for cell in row.cells:
                        if not cells or cell._tc is not cells[-1]._tc:
                            cells.append(cell)
                    texts = (_WHITESPACE.sub(" ", cell.text).strip() for cell in cells)
                    collector.add(" | ".join(text for text in texts if text))
            if collector.full:
                break
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:  # python-docx raises many kinds on a broken package
        _raise_if_out_of_memory(exc)
        raise DocumentRejected(RejectReason.MALFORMED, f"docx: {type(exc).__name__}") from exc
    return title


def _docx_heading_level(paragraph: Any) -> int | None:
    """1-9 for paragraphs styled "Heading N" / "标题 N" (or a style based on one), else None."""
    style = paragraph.style
    for _ in range(5):
        if style is None:
            return None
        if match := _DOCX_HEADING.match((style.name or "").strip()):
            return int(match[1])
        style = style.base_style
    return None


def _parse_pdf(data: bytes, collector: _Collector) -> str | None:
    from pypdf import PasswordType, PdfReader  # heavy, and needed for PDF only

    failures = 0
    title: str | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pypdf warns about every oddity of hostile files
        try:
            reader = PdfReader(io.BytesIO(data), strict=False)
            if reader.is_encrypted:
                try:
                    opened = reader.decrypt("")
                except (MemoryError, RecursionError):
                    raise
                except Exception as exc:  # e.g. an unsupported cipher
                    raise DocumentRejected(RejectReason.ENCRYPTED, type(exc).__name__) from exc
                if opened == PasswordType.NOT_DECRYPTED:
                    raise DocumentRejected(RejectReason.ENCRYPTED, "needs a password")
            pages = reader.pages
            count = len(pages)
            try:
                title = (reader.metadata.title if reader.metadata else None) or None
            except Exception:  # metadata is optional; a broken one costs only the title
                title = None
            for number in range(1, count + 1):
                try:
                    text = pages[number - 1].extract_text()
                except (MemoryError, RecursionError):
                    raise
                except Exception:  # one broken page does not lose the others
                    failures += 1
                    continue
                for paragraph in _paragraphs(text):
                    collector.add(paragraph, page=number)
                if collector.full:
                    break
        except (DocumentRejected, MemoryError, RecursionError):
            raise
        except Exception as exc:  # pypdf raises many kinds on a broken file
            _raise_if_out_of_memory(exc)
            raise DocumentRejected(RejectReason.MALFORMED, f"pdf: {type(exc).__name__}") from exc
    if not collector.blocks and failures:
        raise DocumentRejected(RejectReason.MALFORMED, f"pdf: {failures} unreadable pages")
    return title[:MAX_HEADING_CHARS] if isinstance(title, str) else None
