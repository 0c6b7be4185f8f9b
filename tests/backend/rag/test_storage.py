from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from backend.errors import DocumentRejected, RejectReason
from backend.rag.storage import MAX_NAME_CHARS, UNNAMED, FileStorage, safe_display_name


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_save_is_content_addressed(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "files")
    data = "第一章 总则\n".encode() * 100
    stored = storage.save(io.BytesIO(data), max_bytes=1 << 20)
    sha = hashlib.sha256(data).hexdigest()
    assert stored.key == stored.sha256 == sha
    assert stored.size == len(data)
    assert storage.path(stored.key) == tmp_path / "files" / sha[:2] / sha[2:4] / sha
    assert storage.path(stored.key).read_bytes() == data


def test_save_accepts_bytes(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    stored = storage.save(b"hello", max_bytes=5)
    assert storage.path(stored.key).read_bytes() == b"hello"


def test_same_content_is_stored_once(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    first = storage.save(io.BytesIO(b"same bytes"), max_bytes=100)
    second = storage.save(b"same bytes", max_bytes=100)
    assert first == second
    assert _all_files(tmp_path) == [storage.path(first.key)]


def test_too_large_is_rejected_and_nothing_kept(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    with pytest.raises(DocumentRejected) as caught:
        storage.save(io.BytesIO(b"x" * 3_000_001), max_bytes=3_000_000)
    assert caught.value.reason is RejectReason.TOO_LARGE
    assert _all_files(tmp_path) == []


def test_too_large_stops_reading_at_the_limit(tmp_path: Path) -> None:
    source = io.BytesIO(b"y" * (5 << 20))
    with pytest.raises(DocumentRejected):
        FileStorage(tmp_path).save(source, max_bytes=1 << 20)
    assert source.tell() == (1 << 20) + 1


def test_too_large_bytes_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(DocumentRejected) as caught:
        FileStorage(tmp_path).save(b"abc", max_bytes=2)
    assert caught.value.reason is RejectReason.TOO_LARGE


def test_exactly_max_bytes_is_accepted(tmp_path: Path) -> None:
    stored = FileStorage(tmp_path).save(io.BytesIO(b"z" * 64), max_bytes=64)
    assert stored.size == 64


def test_empty_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DocumentRejected) as caught:
        FileStorage(tmp_path).save(io.BytesIO(b""), max_bytes=10)
    assert caught.value.reason is RejectReason.EMPTY
    assert _all_files(tmp_path) == []


def test_failed_read_leaves_no_temporary_file(tmp_path: Path) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        FileStorage(tmp_path).save(io.BufferedReader(Broken()), max_bytes=100)
    assert _all_files(tmp_path) == []


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "a" * 63,
        "A" * 64,
        "g" * 64,
        "../" + "a" * 61,
        "a" * 64 + "/..",
        "",
    ],
)
def test_hostile_key_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        FileStorage(tmp_path).path(key)


def test_delete(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    stored = storage.save(b"to delete", max_bytes=100)
    assert storage.exists(stored.key)
    assert storage.delete(stored.key) is True
    assert not storage.exists(stored.key)
    assert storage.delete(stored.key) is False


def test_files_are_written_only_under_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    storage = FileStorage(root)
    for payload in (b"a", b"b" * 1000, "中文".encode()):
        storage.save(io.BytesIO(payload), max_bytes=10_000)
    outside = [p for p in _all_files(tmp_path) if root not in p.parents]
    assert outside == []
    assert {p.name for p in _all_files(root)} == {
        hashlib.sha256(p).hexdigest() for p in (b"a", b"b" * 1000, "中文".encode())
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("报告.pdf", "报告.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Windows\\x.pdf", "x.pdf"),
        ("\u202egnp.exe", "gnp.exe"),
        ("abc\u2066def\u2069.txt", "abcdef.txt"),
        ("..", UNNAMED),
        ("", UNNAMED),
        ("\x00\x00", UNNAMED),
        ("a\x00b.pdf", "ab.pdf"),
        ("<script>.pdf", "_script_.pdf"),
        (".bashrc", "bashrc"),
        ("  多   个\t空格\n.md ", "多 个 空格 .md"),
        ("零\u200b宽\ufeff字符.txt", "零宽字符.txt"),
        ("cafe\u0301.txt", "café.txt"),
        ("dir/", UNNAMED),
        ("\u3000全角空格\u3000.txt", "全角空格 .txt"),
    ],
)
def test_safe_display_name(raw: str, expected: str) -> None:
    assert safe_display_name(raw) == expected


def test_long_name_keeps_extension() -> None:
    name = safe_display_name("很" * 1000 + ".docx")
    assert len(name) == MAX_NAME_CHARS
    assert name.endswith(".docx")
    assert name.startswith("很很很")


def test_long_name_without_extension_is_capped() -> None:
    assert safe_display_name("x" * 1000) == "x" * MAX_NAME_CHARS


def test_surrogates_from_undecodable_bytes_are_dropped() -> None:
    raw = os.fsdecode(b"bad\xff\xfename.txt")
    assert safe_display_name(raw) == "badname.txt"


@pytest.mark.parametrize(
    "raw",
    ["../../etc/passwd", "C:\\Windows\\x.pdf", "\u202egnp.exe", "..", "a\x00b", "<script>.pdf"],
)
def test_safe_names_contain_nothing_dangerous(raw: str) -> None:
    name = safe_display_name(raw)
    assert not {"/", "\\", "\x00", "<", ">", "\u202e"} & set(name)
    assert not name.startswith(".")
    assert name
