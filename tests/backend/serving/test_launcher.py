"""The llama.cpp engine command, its URL, and readiness probing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from backend.config import EngineSettings, LLMSettings, Settings
from backend.errors import EngineUnavailable
from backend.serving.launcher import engine_base_url, engine_command, wait_ready

MODEL = Path("/models/qwen.gguf")


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class _ModelsHandler(BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        status = 200 if self.path == "/v1/models" else 404
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def models_server() -> Iterator[tuple[str, list[str]]]:
    """An OpenAI-style base URL whose /models answers 200, and the paths it was asked for."""
    seen: list[str] = []
    handler = type("Handler", (_ModelsHandler,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_command_runs_our_llama_server_entry() -> None:
    assert engine_command(Settings(), MODEL)[:3] == [
        sys.executable,
        "-m",
        "backend.serving.llama_server",
    ]


def test_command_serves_the_model() -> None:
    assert _flag(engine_command(Settings(), MODEL), "--model") == str(MODEL)


def test_command_uses_chatml() -> None:
    assert _flag(engine_command(Settings(), MODEL), "--chat_format") == "chatml"


def test_command_keeps_running_streams() -> None:
    assert _flag(engine_command(Settings(), MODEL), "--interrupt_requests") == "False"


def test_command_keeps_no_per_token_logits() -> None:
    # the server's default is True: every cached prompt state would carry ~600 KiB per token
    assert _flag(engine_command(Settings(), MODEL), "--logits_all") == "False"


def test_flash_attention_follows_the_setting() -> None:
    assert _flag(engine_command(Settings(), MODEL), "--flash_attn") == "True"
    off = Settings(engine={"flash_attn": False})
    assert _flag(engine_command(off, MODEL), "--flash_attn") == "False"


def test_command_names_model_after_llm_setting() -> None:
    settings = Settings(llm=LLMSettings(model="qwen-tiny"))
    assert _flag(engine_command(settings, MODEL), "--model_alias") == "qwen-tiny"


def test_command_zero_threads_means_every_core() -> None:
    settings = Settings(engine=EngineSettings(n_threads=0))
    assert _flag(engine_command(settings, MODEL), "--n_threads") == str(os.cpu_count())


def test_command_explicit_threads() -> None:
    settings = Settings(engine=EngineSettings(n_threads=3))
    assert _flag(engine_command(settings, MODEL), "--n_threads") == "3"


def test_command_ram_prompt_cache() -> None:
    command = engine_command(Settings(engine=EngineSettings(cache_bytes=1 << 20)), MODEL)
    assert [_flag(command, f) for f in ("--cache", "--cache_type", "--cache_size")] == [
        "True", "ram", str(1 << 20)
    ]  # fmt: skip


def test_command_listens_where_configured() -> None:
    settings = Settings(engine=EngineSettings(host="0.0.0.0", port=9001, n_ctx=2048))
    command = engine_command(settings, MODEL)
    flags = [_flag(command, f) for f in ("--host", "--port", "--n_ctx")]
    assert flags == ["0.0.0.0", "9001", "2048"]


def test_base_url_prefers_configured_llm() -> None:
    settings = Settings(llm=LLMSettings(base_url="http://vllm:8000/v1/"))
    assert engine_base_url(settings) == "http://vllm:8000/v1"


def test_base_url_of_local_engine() -> None:
    settings = Settings(engine=EngineSettings(host="127.0.0.1", port=8081))
    assert engine_base_url(settings) == "http://127.0.0.1:8081/v1"


def test_base_url_of_wildcard_bind_is_loopback() -> None:
    settings = Settings(engine=EngineSettings(host="0.0.0.0", port=8081))
    assert engine_base_url(settings) == "http://127.0.0.1:8081/v1"


def test_base_url_of_ipv6_host() -> None:
    settings = Settings(engine=EngineSettings(host="::1", port=8081))
    assert engine_base_url(settings) == "http://[::1]:8081/v1"


async def test_wait_ready_probes_models(models_server: tuple[str, list[str]]) -> None:
    base_url, seen = models_server
    await wait_ready(base_url, timeout_s=10)
    assert seen == ["/v1/models"]


async def test_wait_ready_times_out() -> None:
    with pytest.raises(EngineUnavailable, match="not ready"):
        await wait_ready(f"http://127.0.0.1:{_free_port()}/v1", timeout_s=0.3)


@pytest.fixture
def exited_process() -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    return process


async def test_wait_ready_stops_when_process_exits(exited_process: subprocess.Popen[bytes]) -> None:
    process = exited_process
    with pytest.raises(EngineUnavailable, match="exited with code 3"):
        await wait_ready(f"http://127.0.0.1:{_free_port()}/v1", timeout_s=60, process=process)


@pytest.fixture
def tiny_engine(
    tiny_gguf: Path, tmp_path: Path
) -> Iterator[tuple[Settings, subprocess.Popen[bytes]]]:
    """A llama.cpp server process on the tiny model (not waited for), stopped afterwards."""
    settings = Settings(
        state_dir=tmp_path,
        llm=LLMSettings(model="qwen-tiny"),
        engine=EngineSettings(port=_free_port(), n_threads=1, n_ctx=256, cache_bytes=1 << 24),
    )
    with (tmp_path / "engine.log").open("wb") as log:
        process = subprocess.Popen(engine_command(settings, tiny_gguf), stdout=log, stderr=log)
        try:
            yield settings, process
        finally:
            process.terminate()
            process.wait(30)


@pytest.mark.slow
async def test_engine_serves_tiny_model(
    tiny_engine: tuple[Settings, subprocess.Popen[bytes]],
) -> None:
    settings, process = tiny_engine
    await wait_ready(engine_base_url(settings), timeout_s=120, process=process)
    async with httpx.AsyncClient() as client:
        answer = await client.get(engine_base_url(settings) + "/models")
    assert [model["id"] for model in answer.json()["data"]] == ["qwen-tiny"]
