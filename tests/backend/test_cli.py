"""The `qwen-stack` command line: in-process where it is safe, as a subprocess where it execs or
reads stdin."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.auth import Role, UserStore
from backend.cli import main
from backend.db import open_pool

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "a good password"


@dataclass(frozen=True)
class Run:
    code: int | None
    stdout: str
    stderr: str


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The environment without the outer QWEN_ settings, state under tmp_path (also applied here)."""
    for name in list(os.environ):
        if name.startswith("QWEN_") and not name.startswith("QWEN_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QWEN_STATE_DIR", str(tmp_path / "state"))
    return dict(os.environ)


async def _run_cli(*args: str, env: dict[str, str], stdin: str = "") -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backend.cli", *args, cwd=REPO, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate(stdin.encode())
    return Run(process.returncode, out.decode(), err.decode())


def test_tiny_model_writes_gguf(
    clean_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev", "tiny-model", str(tmp_path / "models")]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert (written.suffix, written.read_bytes()[:4]) == (".gguf", b"GGUF")


def test_invalid_settings_exit_2(
    clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("QWEN_MODE", "production")
    assert main(["dev", "tiny-model", str(tmp_path / "models")]) == 2


def test_invalid_settings_one_line(
    clean_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("QWEN_MODE", "production")
    monkeypatch.setenv("QWEN_UI__AUTH_SECRET", "short-secret")
    main(["dev", "tiny-model", str(tmp_path / "models")])
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("qwen-stack: invalid settings:") and "short-secret" not in line


@pytest.mark.slow
async def test_user_add_reads_password_from_stdin(
    clean_env: dict[str, str], database: str, redis_url: str
) -> None:
    env = {**clean_env, "QWEN_DATABASE__URL": database, "QWEN_REDIS__URL": redis_url}
    run = await _run_cli("user", "add", "bob", "--role", "kb_admin", env=env, stdin=PASSWORD + "\n")
    assert run.code == 0, run.stderr
    pool = await open_pool(database, min_size=1, max_size=1)
    try:
        user = await UserStore(pool).authenticate("bob", PASSWORD)
    finally:
        await pool.close()
    assert user.role is Role.KB_ADMIN


@pytest.mark.slow
async def test_user_add_twice_is_one_line_error(
    clean_env: dict[str, str], database: str, redis_url: str
) -> None:
    env = {**clean_env, "QWEN_DATABASE__URL": database, "QWEN_REDIS__URL": redis_url}
    await _run_cli("user", "add", "bob", env=env, stdin=PASSWORD + "\n")
    run = await _run_cli("user", "add", "bob", env=env, stdin=PASSWORD + "\n")
    assert (run.code, run.stderr) == (2, "qwen-stack: user 'bob' already exists\n")


@pytest.mark.slow
async def test_user_ensure_adds_once_and_leaves_an_existing_login_alone(
    clean_env: dict[str, str], database: str, redis_url: str
) -> None:
    env = {**clean_env, "QWEN_DATABASE__URL": database, "QWEN_REDIS__URL": redis_url}
    first = await _run_cli("user", "ensure", "carol", "--role", "admin", env=env,
                           stdin=PASSWORD + "\n")  # fmt: skip
    again = await _run_cli("user", "ensure", "carol", "--role", "user", env=env,
                           stdin="another-password-123\n")  # fmt: skip
    assert (first.code, again.code) == (0, 0), (first.stderr, again.stderr)
    assert first.stdout.strip() == "added carol (admin)"
    assert again.stdout.strip() == "exists carol (admin); left unchanged"
    pool = await open_pool(database, min_size=1, max_size=1)
    try:
        user = await UserStore(pool).authenticate("carol", PASSWORD)  # the first password holds
    finally:
        await pool.close()
    assert user.role is Role.ADMIN


@pytest.mark.slow
async def test_backend_error_exit_2(clean_env: dict[str, str], tmp_path: Path) -> None:
    env = {**clean_env, "QWEN_ENGINE__MODEL": str(tmp_path / "missing.gguf")}
    run = await _run_cli("engine", env=env)
    assert run.code == 2, run.stderr


@pytest.mark.slow
async def test_backend_error_one_line(clean_env: dict[str, str], tmp_path: Path) -> None:
    env = {**clean_env, "QWEN_ENGINE__MODEL": str(tmp_path / "missing.gguf")}
    run = await _run_cli("engine", env=env)
    [line] = run.stderr.splitlines()
    assert line.startswith("qwen-stack: ") and "Traceback" not in line


def test_guard_check_prints_one_verdict_per_line(tmp_path: Path) -> None:
    lexicon = tmp_path / "test.tsv"
    lexicon.write_text("赌博网站\t赌博\tblock\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "backend.cli", "guard", "check", "--lexicon", str(lexicon)],
        input="今天天气很好\n推荐一个賭 博 網站\n",
        capture_output=True, text=True, check=False,
        env={**os.environ, "QWEN_STATE_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    clean, hit = (json.loads(line) for line in result.stdout.splitlines())
    assert clean["blocked"] is False
    assert hit["blocked"] is True and hit["category"] == "赌博"
    start, end = hit["hits"][0]["span"]
    assert "推荐一个賭 博 網站"[start:end] == "賭 博 網站"
