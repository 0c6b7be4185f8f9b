"""Durable, content-addressed storage of uploaded files, and the file name users see.

A file is kept under its SHA-256: `<root>/ab/cd/<sha256>`. Paths are never built from anything a
user sent: `save` streams into a temporary file inside `root`, hashes while copying and renames it
into place atomically (same file system), so a reader never sees half a file and a crash leaves at
most a stray temporary file in `<root>/.incoming/`. Identical content is stored once: the key is
the hash, and a second save of the same bytes drops its temporary copy.

All methods do blocking file I/O; async callers run them in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from backend.errors import DocumentRejected, RejectReason

logger = logging.getLogger(__name__)

_COPY_BYTES = 1 << 20
_KEY = re.compile(r"[0-9a-f]{64}")
_INCOMING = ".incoming"

UNNAMED = "未命名文件"
MAX_NAME_CHARS = 120
_MAX_EXTENSION_CHARS = 16
# Characters Windows refuses in file names; `<` and `>` would also let a name pass for markup.
_RESERVED = str.maketrans(dict.fromkeys('<>:"|?*', "_"))
# Unicode categories dropped from names: controls (NUL, ESC, ...), format characters (bidi
# overrides U+202A-U+202E and isolates U+2066-U+2069, zero-width space/joiners, BOM, soft hyphen)
# and lone surrogates (undecodable bytes of a file name).
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})
# Whitespace-like controls become spaces rather than vanishing, so "a\tb" reads "a b".
_SPACE_CONTROLS = frozenset("\t\n\r\v\f\x1c\x1d\x1e\x1f\x85\u2028\u2029")


@dataclass(frozen=True)
class StoredFile:
    """A saved file: `key` names it in the storage (today the SHA-256 itself), `size` in bytes."""

    key: str
    sha256: str
    size: int


class FileStorage:
    """Files under `root`, addressed by the SHA-256 of their content.

    Safe for concurrent use by several threads and processes on one file system: every write goes
    through its own temporary file and an atomic rename.
    """

    def __init__(self, root: Path) -> None:
        self._root = root

    @property
    def root(self) -> Path:
        return self._root

    def save(self, source: BinaryIO | bytes, *, max_bytes: int) -> StoredFile:
        """Store the bytes of `source` (read from its current position to its end).

        Raises DocumentRejected(TOO_LARGE) past `max_bytes` (reading stops there) and
        DocumentRejected(EMPTY) for 0 bytes; nothing is kept in either case.
        """
        incoming = self._root / _INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=incoming, prefix="upload-")
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = _copy(source, out, max_bytes=max_bytes)
                out.flush()
                os.fsync(out.fileno())
            if size == 0:
                raise DocumentRejected(RejectReason.EMPTY)
            sha256 = digest.hexdigest()
            target = self.path(sha256)
            if target.exists():
                temp.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp, target)
                _fsync_dir(target.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        return StoredFile(key=sha256, sha256=sha256, size=size)

    def path(self, key: str) -> Path:
        """Where the file of `key` lives (it may not exist). Raises ValueError for a key that is
        not 64 lowercase hex digits, so no key can name a path outside `root`."""
        if not _KEY.fullmatch(key):
            raise ValueError("a storage key is 64 lowercase hex digits")
        return self._root / key[:2] / key[2:4] / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> bool:
        """Remove the file of `key`; returns whether it existed.

        Content is shared: the caller deletes only when no document references `key` any more.
        """
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True


def _copy(source: BinaryIO | bytes, out: BinaryIO, *, max_bytes: int) -> tuple[hashlib._Hash, int]:
    digest = hashlib.sha256()
    size = 0
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > max_bytes:
            raise DocumentRejected(RejectReason.TOO_LARGE, f"{len(data)} > {max_bytes} bytes")
        digest.update(data)
        out.write(data)
        return digest, len(data)
    while True:
        # One byte past the limit is enough to know the file is too large.
        block = source.read(min(_COPY_BYTES, max_bytes - size + 1))
        if not block:
            return digest, size
        size += len(block)
        if size > max_bytes:
            raise DocumentRejected(RejectReason.TOO_LARGE, f"more than {max_bytes} bytes")
        digest.update(block)
        out.write(block)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync of %s not supported", directory)
    finally:
        os.close(fd)


def safe_display_name(name: str) -> str:
    """The uploaded file's name as shown to users and stored in the document row.

    Keeps the last path component (either separator), drops control, format (bidi overrides and
    isolates, zero-width characters) and surrogate characters, replaces characters that Windows
    refuses (`<>:"|?*`) with `_`, collapses whitespace, strips leading dots and spaces and trailing
    dots and spaces, NFC-normalises and caps the length at MAX_NAME_CHARS characters, keeping a
    short extension. Chinese and other scripts are kept. Never empty: falls back to UNNAMED.
    The result is display text, not a path: storage never uses it.
    """
    text = unicodedata.normalize("NFC", name)
    text = re.split(r"[/\\]", text)[-1]
    kept = []
    for char in text:
        if char in _SPACE_CONTROLS:
            kept.append(" ")
        elif unicodedata.category(char) not in _DROPPED_CATEGORIES:
            kept.append(char)
    text = " ".join("".join(kept).translate(_RESERVED).split())
    text = text.lstrip(". ").rstrip(". ")
    text = unicodedata.normalize("NFC", text)
    if len(text) > MAX_NAME_CHARS:
        stem, dot, extension = text.rpartition(".")
        if dot and stem and len(extension) <= _MAX_EXTENSION_CHARS:
            text = stem[: MAX_NAME_CHARS - len(extension) - 1].rstrip(". ") + "." + extension
        else:
            text = text[:MAX_NAME_CHARS].rstrip(". ")
    return text or UNNAMED
