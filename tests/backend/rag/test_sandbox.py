"""The parsing sandbox: real child processes, real rlimits, and fake interpreters for odd exits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.config import RagSettings
from backend.errors import DocumentRejected, RejectReason
from backend.rag.document import Block, DocumentFormat, ParsedDocument
from backend.rag.parsing import parse_bytes
from backend.rag.sandbox import (
    ParseLimits,
    SandboxParser,
    document_from_json,
    document_to_json,
    rejection_to_json,
)
from tests.fixtures.documents import make_large_html, make_large_text

LIMITS = ParseLimits(cpu_s=20, memory_mb=512, max_bytes=4 << 20, max_chars=100_000)


async def rejection(parser: SandboxParser, path: Path) -> RejectReason:
    with pytest.raises(DocumentRejected) as caught:
        await parser.parse(path)
    return caught.value.reason


def fake_python(tmp_path: Path, script: str) -> str:
    """An executable that stands in for the child's interpreter and runs `script` in sh."""
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


def children() -> set[int]:
    """Live (non-zombie) child processes of this test process."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.mark.parametrize(
    "name",
    ["sample.pdf", "pdf_named.txt", "sample.docx", "sample.html", "sample.md", "gb18030.txt"],
)
async def test_child_parses_like_the_parent(document_files: dict[str, Path], name: str) -> None:
    expected = parse_bytes(document_files[name].read_bytes(), max_chars=LIMITS.max_chars)
    assert await SandboxParser(LIMITS).parse(document_files[name]) == expected


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("encrypted.pdf", RejectReason.ENCRYPTED),
        ("truncated.pdf", RejectReason.MALFORMED),
        ("bomb.docx", RejectReason.ARCHIVE_BOMB),
        ("entities.docx", RejectReason.XML_ENTITIES),
        ("entities.html", RejectReason.XML_ENTITIES),
        ("elf_named.pdf", RejectReason.UNSUPPORTED_TYPE),
    ],
)
async def test_child_rejections_reach_the_parent(
    document_files: dict[str, Path], name: str, reason: RejectReason
) -> None:
    assert await rejection(SandboxParser(LIMITS), document_files[name]) is reason


async def test_empty_file_is_refused_before_spawning(tmp_path: Path) -> None:
    path = tmp_path / "empty.pdf"
    path.write_bytes(b"")
    parser = SandboxParser(LIMITS, interpreter=str(tmp_path / "missing-python"))
    assert await rejection(parser, path) is RejectReason.EMPTY


async def test_oversized_file_is_refused_before_spawning(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 101)
    limits = ParseLimits(cpu_s=5, memory_mb=256, max_bytes=100, max_chars=1000)
    parser = SandboxParser(limits, interpreter=str(tmp_path / "missing-python"))
    assert await rejection(parser, path) is RejectReason.TOO_LARGE


async def test_cpu_limit_kills_the_child(tmp_path: Path) -> None:
    path = tmp_path / "big.html"
    path.write_bytes(make_large_html(8))  # several CPU seconds of lxml and tree walking
    limits = ParseLimits(cpu_s=1, memory_mb=1024, max_bytes=16 << 20, max_chars=10_000_000)
    assert await rejection(SandboxParser(limits), path) is RejectReason.RESOURCE_LIMIT
    small = tmp_path / "small.txt"
    small.write_text("之后照常解析。")
    assert (await SandboxParser(limits).parse(small)).text == "之后照常解析。\n"


async def test_memory_limit_stops_the_child(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(make_large_text(20))  # its text, paragraphs and JSON need well over 80 MiB
    limits = ParseLimits(cpu_s=20, memory_mb=80, max_bytes=32 << 20, max_chars=50_000_000)
    assert await rejection(SandboxParser(limits), path) is RejectReason.RESOURCE_LIMIT


async def test_wall_clock_timeout_kills_the_child(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    limits = ParseLimits(cpu_s=5, memory_mb=256, max_bytes=1000, max_chars=1000, wall_s=0.5)
    parser = SandboxParser(limits, interpreter=fake_python(tmp_path, "exec sleep 30"))
    before = children()
    assert await rejection(parser, path) is RejectReason.RESOURCE_LIMIT
    assert children() <= before


async def test_cancelling_kills_the_child(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    parser = SandboxParser(LIMITS, interpreter=fake_python(tmp_path, "exec sleep 30"))
    before = children()
    task = asyncio.create_task(parser.parse(path))
    while not children() - before:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert children() <= before


async def test_child_runs_with_limits_and_a_bare_environment(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    reply = document_to_json(ParsedDocument(DocumentFormat.TXT, (Block("limited", 0),)))
    checks = (
        '[ "$(ulimit -t)" = 7 ] && [ "$(ulimit -f)" = 0 ] && [ "$(ulimit -n)" = 32 ] '
        '&& [ "$(ulimit -v)" = 131072 ] && [ "$(ulimit -c)" = 0 ] && [ "$(pwd)" = / ] '
        '&& [ -z "$HOME" ] && [ -n "$PYTHONPATH" ] && [ "$(cat)" = text ] '
        f"&& printf '%s' '{reply.decode()}'"
    )
    limits = ParseLimits(cpu_s=7, memory_mb=128, max_bytes=1000, max_chars=1000)
    parser = SandboxParser(limits, interpreter=fake_python(tmp_path, checks))
    assert (await parser.parse(path)).text == "limited\n"


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("exit 3", RejectReason.MALFORMED),
        ("echo 'MemoryError' >&2; exit 1", RejectReason.RESOURCE_LIMIT),
        ("kill -KILL $$", RejectReason.RESOURCE_LIMIT),
        ("kill -SEGV $$", RejectReason.MALFORMED),
        ("printf 'not json'", RejectReason.MALFORMED),
        ('printf \'{"reason": "nope"}\'', RejectReason.MALFORMED),
        ('printf \'{"reason": "encrypted", "detail": "x"}\'', RejectReason.ENCRYPTED),
        ("head -c 70000000 /dev/zero", RejectReason.MALFORMED),
    ],
    ids=["exit", "oom-exit", "sigkill", "segv", "garbage", "bad-reason", "reason", "flood"],
)
async def test_child_outcomes(tmp_path: Path, script: str, reason: RejectReason) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    limits = ParseLimits(cpu_s=5, memory_mb=64, max_bytes=1000, max_chars=1000)
    parser = SandboxParser(limits, interpreter=fake_python(tmp_path, script))
    assert await rejection(parser, path) is reason


def test_child_imports_stay_light() -> None:
    code = (
        "import sys, backend.rag.sandbox; "
        "print(sorted({'torch', 'FlagEmbedding', 'pypdf', 'docx', 'lxml'} & set(sys.modules)))"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert done.stdout.strip() == "[]"


def test_json_round_trip() -> None:
    document = parse_bytes('# 标题\n\n正文，"引号"\t\\。\n'.encode(), max_chars=1000)
    assert document_from_json(document_to_json(document)) == document


def test_json_offsets_must_index_the_text() -> None:
    document = ParsedDocument(DocumentFormat.TXT, (Block("a", 0), Block("b", 2)))
    tampered = document_to_json(document).replace(b'"offset": 2', b'"offset": 3')
    with pytest.raises(ValueError, match="offset"):
        document_from_json(tampered)


def test_json_rejection_raises() -> None:
    data = rejection_to_json(DocumentRejected(RejectReason.NO_TEXT, "scan"))
    with pytest.raises(DocumentRejected) as caught:
        document_from_json(data)
    assert (caught.value.reason, caught.value.detail) == (RejectReason.NO_TEXT, "scan")


def test_limits_from_settings() -> None:
    rag = RagSettings(max_file_mb=2.5, parse_cpu_s=9, parse_memory_mb=700, parse_max_chars=42)
    limits = ParseLimits.from_settings(rag)
    assert limits == ParseLimits(cpu_s=9, memory_mb=700, max_bytes=2_621_440, max_chars=42)
    assert limits.timeout_s == 29.0
