"""Which format an uploaded file is, by content (never by name or MIME type), and the checks that
refuse a hostile container before any parser runs: a DOCX zip with more than `MAX_ZIP_ENTRIES`
entries, more than `MAX_UNCOMPRESSED` bytes uncompressed, or a ratio above `MAX_RATIO`:1 once past
`RATIO_FLOOR` bytes is an ARCHIVE_BOMB; an entry declaring `<!DOCTYPE` or `<!ENTITY` is
XML_ENTITIES. Pure and in-process; raises only DocumentRejected. Used by `parsing` (and by the
upload path, for a quick answer before the job is queued).
"""

from __future__ import annotations

import codecs
import io
import re
import zipfile

from backend.errors import DocumentRejected, RejectReason
from backend.rag.document import DocumentFormat

MAX_ZIP_ENTRIES = 2000
MAX_UNCOMPRESSED = 512 * 1024 * 1024
MAX_RATIO = 100
RATIO_FLOOR = 16 * 1024 * 1024

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_BINARY_MAGIC = (
    _OLE_MAGIC,
    b"\x89PNG",
    b"\x7fELF",
    b"GIF8",
    b"\xff\xd8\xff",  # JPEG
    b"MZ",  # Windows executable
    b"\x1f\x8b",  # gzip
    b"BZh",
    b"7z\xbc\xaf",
    b"Rar!",
    b"\xfd7zXZ",
    b"II*\x00",  # TIFF
    b"MM\x00*",
    b"RIFF",
    b"\x00asm",
    b"\xca\xfe\xba\xbe",
    b"\xcf\xfa\xed\xfe",  # Mach-O
    b"{\\rtf",
)
_ENTITY_MARKERS = tuple(
    marker.encode(encoding)
    for marker in ("<!doctype", "<!entity")
    for encoding in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
)
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\ud800-\udfff]")
_HTML_START = re.compile(
    r"(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)\b", re.S
)
_HTML_TAG = re.compile(
    r"<(?:head|body|title|meta|div|p|h[1-6]|table|ul|ol|span|a|br|section|article)[\s>/]"
)
_MD_STRONG = re.compile(r"^(?:#{1,6}[ \t]+\S| {0,3}(?:```|~~~))|\[[^\]\n]+\]\([^)\n]+\)", re.M)
_MD_LIST = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)])[ \t]+\S", re.M)


def detect_format(data: bytes) -> DocumentFormat:
    """The format of a whole file, by content. Raises DocumentRejected (EMPTY, UNSUPPORTED_TYPE,
    ENCRYPTED for a password-protected Office file, MALFORMED for a broken zip)."""
    return sniff(data)[0]


def check_zip(data: bytes) -> None:
    """Refuse a zip that would unpack to too much (ARCHIVE_BOMB) or holds XML entity declarations
    (XML_ENTITIES); MALFORMED if it cannot be read. Streams every entry in 1 MiB pieces."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise DocumentRejected(RejectReason.MALFORMED, f"bad zip: {exc}") from exc
    total = sum(entry.file_size for entry in entries)
    if len(entries) > MAX_ZIP_ENTRIES:
        raise DocumentRejected(RejectReason.ARCHIVE_BOMB, f"{len(entries)} zip entries")
    if total > MAX_UNCOMPRESSED or (total > RATIO_FLOOR and total > MAX_RATIO * len(data)):
        raise DocumentRejected(RejectReason.ARCHIVE_BOMB, f"{total} bytes from {len(data)}")
    longest = max(len(marker) for marker in _ENTITY_MARKERS)
    for entry in entries:
        if entry.flag_bits & 0x1:
            raise DocumentRejected(RejectReason.ENCRYPTED, "encrypted zip entry")
        try:
            with archive.open(entry) as stream:
                carry = b""
                while chunk := stream.read(1 << 20):
                    window = carry + chunk.lower()
                    if any(marker in window for marker in _ENTITY_MARKERS):
                        raise DocumentRejected(RejectReason.XML_ENTITIES, entry.filename[:100])
                    carry = window[-longest:]
        except (DocumentRejected, MemoryError, RecursionError):
            raise
        except Exception as exc:  # zlib.error, CRC mismatch, unknown method: a broken file
            raise DocumentRejected(RejectReason.MALFORMED, f"bad zip entry: {exc}") from exc


def decode_text(data: bytes) -> str:
    """Bytes of a text file as str: UTF-8 (BOM optional), UTF-16 with a BOM, else GB18030.
    Raises DocumentRejected(UNSUPPORTED_TYPE) for binary data."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates: tuple[tuple[bytes, str], ...] = ((data, "utf-16"),)
    elif b"\x00" in data:
        raise DocumentRejected(RejectReason.UNSUPPORTED_TYPE, "binary: NUL bytes")
    elif data.startswith(codecs.BOM_UTF8):
        candidates = ((data[len(codecs.BOM_UTF8) :], "utf-8"),)
    else:
        candidates = ((data, "utf-8"), (data, "gb18030"))
    for raw, encoding in candidates:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        sample = text[:4096]
        if len(CONTROL_CHARS.findall(sample)) > len(sample) // 100 + 2:  # a stray ^Z is still text
            break
        return text
    raise DocumentRejected(RejectReason.UNSUPPORTED_TYPE, "binary: not UTF-8 or GB18030 text")


def sniff(data: bytes) -> tuple[DocumentFormat, str]:
    """The format, and the decoded text for text formats ("" for PDF and DOCX)."""
    if not data:
        raise DocumentRejected(RejectReason.EMPTY, "0 bytes")
    if data.startswith(b"%PDF-"):
        return DocumentFormat.PDF, ""
    if data.startswith(_ZIP_MAGIC):
        try:
            names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
            raise DocumentRejected(RejectReason.MALFORMED, f"bad zip: {exc}") from exc
        if "word/document.xml" in names:
            return DocumentFormat.DOCX, ""
        raise DocumentRejected(RejectReason.UNSUPPORTED_TYPE, "zip without word/document.xml")
    if data.startswith(_OLE_MAGIC) and "EncryptedPackage".encode("utf-16-le") in data:
        raise DocumentRejected(RejectReason.ENCRYPTED, "password-protected Office file")
    if data.startswith(_BINARY_MAGIC):
        raise DocumentRejected(RejectReason.UNSUPPORTED_TYPE, f"binary magic {data[:4]!r}")
    text = decode_text(data)
    head = text[:1024].lstrip("\ufeff \t\r\n").lower()
    if _HTML_START.match(head):
        return DocumentFormat.HTML, text
    sample = text[:65536]
    if _MD_STRONG.search(sample) or len(_MD_LIST.findall(sample)) >= 2:
        return DocumentFormat.MARKDOWN, text
    if head.startswith("<") and _HTML_TAG.search(head):
        return DocumentFormat.HTML, text
    return DocumentFormat.TXT, text
