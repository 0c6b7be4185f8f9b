"""The parsing sandbox: a real zygote forking real children under real rlimits; stand-in child
functions (tests/fixtures/sandbox_children.py) for the odd ways a child can end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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


async def test_empty_file_is_refused_before_starting_a_zygote(tmp_path: Path) -> None:
    path = tmp_path / "empty.pdf"
    path.write_bytes(b"")
    parser = SandboxParser(LIMITS, interpreter=str(tmp_path / "missing-python"))
    assert await rejection(parser, path) is RejectReason.EMPTY


async def test_oversized_file_is_refused_before_starting_a_zygote(tmp_path: Path) -> None:
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


def child(name: str) -> str:
    return f"tests.fixtures.sandbox_children:{name}"


def descendants(pid: int) -> set[int]:
    """Live (non-zombie) processes below `pid`."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_zygote_is_reused_and_forks_a_child_per_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    parser = SandboxParser(LIMITS, child=child("report"))
    try:
        first = json.loads((await parser.parse(path)).text)
        [zygote] = parser.zygote_pids
        second = json.loads((await parser.parse(path)).text)
        assert parser.zygote_pids == [zygote]
        assert first["ppid"] == second["ppid"] == zygote
        assert first["pid"] != second["pid"]
        assert first["pgid"] == first["pid"]  # a process group of its own
        assert descendants(zygote) == set()  # each child is gone once its reply is in
    finally:
        parser.close()
    await wait_until(lambda: not descendants(os.getpid()) & {zygote})


async def test_concurrent_calls_get_a_zygote_each(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    parser = SandboxParser(LIMITS, child=child("report"))
    try:
        replies = await asyncio.gather(*(parser.parse(path) for _ in range(3)))
        parents = {json.loads(reply.text)["ppid"] for reply in replies}
        assert len(parents) == 3
        assert set(parser.zygote_pids) == parents
    finally:
        parser.close()


async def test_dead_idle_zygote_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("之后照常解析。")
    parser = SandboxParser(LIMITS)
    try:
        await parser.parse(path)
        [zygote] = parser.zygote_pids
        os.kill(zygote, signal.SIGKILL)
        assert (await parser.parse(path)).text == "之后照常解析。\n"
        assert parser.zygote_pids != [zygote]
    finally:
        parser.close()


async def test_zygote_that_cannot_start_is_an_os_error(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    parser = SandboxParser(LIMITS, interpreter=str(tmp_path / "missing-python"))
    with pytest.raises(OSError):
        await parser.parse(path)


async def test_wall_clock_timeout_kills_the_child_and_what_it_started(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    limits = ParseLimits(cpu_s=5, memory_mb=256, max_bytes=1000, max_chars=1000, wall_s=0.5)
    parser = SandboxParser(limits, child=child("sleep_with_grandchild"))
    try:
        assert await rejection(parser, path) is RejectReason.RESOURCE_LIMIT
        [zygote] = parser.zygote_pids
        await wait_until(lambda: descendants(zygote) == set())
    finally:
        parser.close()


async def test_cancelling_kills_the_child(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    parser = SandboxParser(LIMITS, child=child("sleep"))
    before = descendants(os.getpid())
    task = asyncio.create_task(parser.parse(path))
    # the zygote and its child
    await wait_until(lambda: len(descendants(os.getpid()) - before) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: descendants(os.getpid()) <= before)


async def test_child_runs_with_limits_and_a_bare_environment(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    limits = ParseLimits(cpu_s=7, memory_mb=128, max_bytes=1000, max_chars=999)
    parser = SandboxParser(limits, child=child("report"))
    try:
        facts = json.loads((await parser.parse(path)).text)
    finally:
        parser.close()
    assert facts["limits"] == {
        "RLIMIT_CPU": [7, 8], "RLIMIT_AS": [128 << 20, 128 << 20], "RLIMIT_FSIZE": [0, 0],
        "RLIMIT_NOFILE": [32, 32], "RLIMIT_CORE": [0, 0],
    }  # fmt: skip
    assert facts["cwd"] == "/"
    # PYTHONPATH and PATH only (Python itself may add LC_CTYPE under the C locale)
    assert {"PATH", "PYTHONPATH"} <= set(facts["env"]) <= {"PATH", "PYTHONPATH", "LC_CTYPE"}
    assert facts["data"] == "text"
    assert facts["max_chars"] == 999


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("exit_3", RejectReason.MALFORMED),
        ("out_of_memory_exit", RejectReason.RESOURCE_LIMIT),
        ("sigkill", RejectReason.RESOURCE_LIMIT),
        ("segv", RejectReason.MALFORMED),
        ("raises", RejectReason.MALFORMED),
        ("garbage", RejectReason.MALFORMED),
        ("bad_reason", RejectReason.MALFORMED),
        ("reason", RejectReason.ENCRYPTED),
        ("flood", RejectReason.MALFORMED),
    ],
)
async def test_child_outcomes(tmp_path: Path, name: str, reason: RejectReason) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")
    limits = ParseLimits(cpu_s=5, memory_mb=100, max_bytes=1000, max_chars=1000)
    parser = SandboxParser(limits, child=child(name))
    try:
        assert await rejection(parser, path) is reason
        # the zygote survives every way a child can end, and parses the next file
        [zygote] = parser.zygote_pids
        assert descendants(zygote) == set()
    finally:
        parser.close()


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
