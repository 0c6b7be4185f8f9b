"""What `qwen-stack up` runs: the plan of child processes and the UI command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backend.config import (
    EmbedderKind,
    EngineSettings,
    LLMSettings,
    RagSettings,
    Settings,
    UISettings,
)
from backend.stack import ENGINE, RAG, UI, plan, ui_command

MODEL = Path("/models/qwen.gguf")


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Settings on fixed ports under tmp_path, whatever QWEN_ variables the outer shell has."""
    for name in list(os.environ):
        if name.startswith("QWEN_") and not name.startswith("QWEN_TEST_"):
            monkeypatch.delenv(name)
    return Settings(
        state_dir=tmp_path,
        engine=EngineSettings(host="127.0.0.1", port=8181),
        ui=UISettings(host="127.0.0.1", port=8100),
        rag=RagSettings(host="127.0.0.1", port=8200),
    )


def test_local_engine_plans_engine_then_rag_worker_then_ui(settings: Settings) -> None:
    children = plan(settings, env={}, model=MODEL).children
    assert [child.name for child in children] == [ENGINE, RAG, UI]


def test_rag_worker_is_ready_when_readyz_answers(settings: Settings) -> None:
    worker = next(c for c in plan(settings, env={}, model=MODEL).children if c.name == RAG)
    assert worker.ready_url == "http://127.0.0.1:8200/readyz"


def test_rag_worker_is_told_the_embedder(settings: Settings) -> None:
    small = settings.model_copy(
        update={
            "rag": RagSettings(embedder=EmbedderKind.FLAG, embedding_model="/m", embedding_dim=384)
        }
    )
    worker = next(c for c in plan(small, env={}, model=MODEL).children if c.name == RAG)
    assert (worker.env["QWEN_RAG__EMBEDDER"], worker.env["QWEN_RAG__EMBEDDING_DIM"]) == (
        "flag",
        "384",
    )


def test_engine_is_ready_when_models_answer(settings: Settings) -> None:
    engine = plan(settings, env={}, model=MODEL).children[0]
    assert engine.ready_url == "http://127.0.0.1:8181/v1/models"


def test_engine_serves_the_model(settings: Settings) -> None:
    engine = plan(settings, env={}, model=MODEL).children[0]
    assert str(MODEL) in engine.argv


def test_ui_is_ready_when_healthz_answers(settings: Settings) -> None:
    ui = plan(settings, env={}, model=MODEL).children[-1]
    assert ui.ready_url == "http://127.0.0.1:8100/healthz"


def test_children_get_env(settings: Settings) -> None:
    env = {"QWEN_REDIS__URL": "unix:///tmp/redis.sock"}
    children = plan(settings, env=env, model=MODEL).children
    assert all(env.items() <= dict(child.env).items() for child in children)


def test_ui_is_told_the_replicas(settings: Settings) -> None:
    children = plan(settings, env={}, model=MODEL, engines=2).children
    ui = next(child for child in children if child.name == "ui")
    replicas = json.loads(ui.env["QWEN_SERVING__REPLICAS"])
    engines = [child for child in children if child.name.startswith("engine")]
    assert [c.name for c in engines] == ["engine-1", "engine-2"]
    assert [c.ready_url.removesuffix("/models") for c in engines if c.ready_url] == replicas


def test_logs_go_to_run_dir(settings: Settings) -> None:
    children = plan(settings, env={}, model=MODEL).children
    assert {child.log_path.parent for child in children} == {settings.run_dir / "logs"}


def test_external_engine_plans_no_engine(settings: Settings) -> None:
    external = settings.model_copy(update={"llm": LLMSettings(base_url="http://vllm:8000/v1")})
    children = plan(external, env={}, model=None).children
    assert [child.name for child in children] == [RAG, UI]


def test_wildcard_ui_host_is_reached_on_loopback(settings: Settings) -> None:
    wildcard = settings.model_copy(update={"ui": UISettings(host="0.0.0.0", port=8100)})
    assert plan(wildcard, env={}, model=None).ui_url == "http://127.0.0.1:8100"


def test_ui_command_binds_configured_address(settings: Settings) -> None:
    argv = ui_command(settings)
    bind = argv[argv.index("--host") + 1], argv[argv.index("--port") + 1]
    assert bind == ("127.0.0.1", "8100")


def test_ui_command_builds_app_factory(settings: Settings) -> None:
    argv = ui_command(settings)
    assert argv[argv.index("chat_ui.server:create_app") + 1] == "--factory"


def test_ui_is_told_the_rag_worker(settings: Settings) -> None:
    ui = next(c for c in plan(settings, env={}, model=MODEL).children if c.name == UI)
    assert ui.env["QWEN_RAG__WORKER_URL"] == "http://127.0.0.1:8200"
