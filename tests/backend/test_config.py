"""Settings from the environment: prefix, nesting, and production refusing dev secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.config import Mode, Settings, child_env, export_chainlit_env

REAL_SECRET = "a-real-secret-that-is-long-enough-0123456789"
REAL_PASSWORD = "a real admin password"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """monkeypatch, with every QWEN_ setting of the outer environment removed."""
    for name in list(os.environ):
        if name.startswith("QWEN_") and not name.startswith("QWEN_TEST_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _production_error(env: pytest.MonkeyPatch) -> str:
    env.setenv("QWEN_MODE", "production")
    with pytest.raises(ValidationError) as caught:
        Settings()
    return str(caught.value)


def test_dev_mode_is_default(env: pytest.MonkeyPatch) -> None:
    assert Settings().mode is Mode.DEV


def test_production_refuses_dev_secrets(env: pytest.MonkeyPatch) -> None:
    message = _production_error(env)
    assert "QWEN_UI__AUTH_SECRET" in message and "QWEN_UI__ADMIN_PASSWORD" in message


def test_production_names_only_dev_secrets(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_UI__AUTH_SECRET", REAL_SECRET)
    message = _production_error(env)
    assert "QWEN_UI__ADMIN_PASSWORD" in message and "QWEN_UI__AUTH_SECRET" not in message


def test_production_refuses_short_auth_secret(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_UI__AUTH_SECRET", "short-secret")
    env.setenv("QWEN_UI__ADMIN_PASSWORD", REAL_PASSWORD)
    env.setenv("QWEN_RAG__SERVICE_TOKEN", REAL_SECRET + "-rag")
    env.setenv("QWEN_AUDIT__HMAC_KEY", REAL_SECRET + "-audit")
    assert "at least 32 characters" in _production_error(env)


def test_refusal_does_not_echo_input(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_UI__AUTH_SECRET", "short-secret")
    env.setenv("QWEN_DATABASE__URL", "postgresql://qwen:db-password@db/qwen")
    message = _production_error(env)
    assert "short-secret" not in message and "db-password" not in message


def test_production_with_real_secrets_passes(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_MODE", "production")
    env.setenv("QWEN_UI__AUTH_SECRET", REAL_SECRET)
    env.setenv("QWEN_UI__ADMIN_PASSWORD", REAL_PASSWORD)
    env.setenv("QWEN_RAG__SERVICE_TOKEN", REAL_SECRET + "-rag")
    env.setenv("QWEN_AUDIT__HMAC_KEY", REAL_SECRET + "-audit")
    assert Settings().mode is Mode.PRODUCTION


def test_production_refuses_dev_rag_token(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_UI__AUTH_SECRET", REAL_SECRET)
    env.setenv("QWEN_UI__ADMIN_PASSWORD", REAL_PASSWORD)
    assert "QWEN_RAG__SERVICE_TOKEN" in _production_error(env)


def test_production_refuses_dev_audit_key(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_UI__AUTH_SECRET", REAL_SECRET)
    env.setenv("QWEN_UI__ADMIN_PASSWORD", REAL_PASSWORD)
    env.setenv("QWEN_RAG__SERVICE_TOKEN", REAL_SECRET + "-rag")
    assert "QWEN_AUDIT__HMAC_KEY" in _production_error(env)


def test_audit_key_from_env(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_AUDIT__HMAC_KEY", REAL_SECRET)
    assert Settings().audit.hmac_key.get_secret_value() == REAL_SECRET


def test_rate_limits_from_env(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_RATELIMIT__MESSAGES_PER_MINUTE", "30")
    env.setenv("QWEN_RATELIMIT__CONCURRENT_ANSWERS", "1")
    limits = Settings().ratelimit
    assert (limits.messages_per_minute, limits.concurrent_answers) == (30.0, 1)


def test_env_prefix(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_LOG_LEVEL", "DEBUG")
    assert Settings().log_level == "DEBUG"


def test_unprefixed_variable_ignored(env: pytest.MonkeyPatch) -> None:
    env.setenv("LOG_LEVEL", "DEBUG")
    assert Settings().log_level == "INFO"


def test_nested_delimiter(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_LLM__BASE_URL", "http://vllm:8000/v1")
    env.setenv("QWEN_ENGINE__PORT", "9001")
    settings = Settings()
    assert (settings.llm.base_url, settings.engine.port) == ("http://vllm:8000/v1", 9001)


def test_discover_from_env(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_SERVING__DISCOVER", "qwen-engine-pods.qwen.svc.cluster.local:8080")
    assert Settings().serving.discover == "qwen-engine-pods.qwen.svc.cluster.local:8080"


def test_discover_refuses_a_url(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_SERVING__DISCOVER", "http://qwen-engine-pods:8080/v1")
    with pytest.raises(ValidationError, match=r"QWEN_SERVING__DISCOVER: .* is not host:port"):
        Settings()


def test_discover_refuses_a_bad_port(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_SERVING__DISCOVER", "qwen-engine-pods:65536")
    with pytest.raises(ValidationError, match="port 65536"):
        Settings()


def test_empty_discover_is_off(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_SERVING__DISCOVER", "")
    assert Settings().serving.discover is None


def test_nested_secret(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_DATABASE__URL", "postgresql://db/qwen")
    url = Settings().database.url
    assert url is not None and url.get_secret_value() == "postgresql://db/qwen"


def test_run_dir_is_under_state_dir(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("QWEN_STATE_DIR", str(tmp_path))
    assert Settings().run_dir == tmp_path / "run"


def test_child_env_applies_overrides(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_LOG_LEVEL", "DEBUG")
    child = child_env({"QWEN_REDIS__URL": "redis://r"})
    assert (child["QWEN_LOG_LEVEL"], child["QWEN_REDIS__URL"]) == ("DEBUG", "redis://r")


def test_chainlit_env_drops_database_url(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("DATABASE_URL", "postgresql://chainlit-would-use-this")
    for name in ("CHAINLIT_APP_ROOT", "CHAINLIT_AUTH_SECRET"):  # restored after the test
        env.setenv(name, "before")
    export_chainlit_env(Settings(), app_root=tmp_path)
    assert "DATABASE_URL" not in os.environ
