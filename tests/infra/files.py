"""The infra files of the repository, loaded, and the facts of the code they must agree with."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics_core import Metric
from pydantic import BaseModel, SecretStr

from backend.config import Settings
from backend.metrics import Metrics, RagMetrics

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
PROMETHEUS = INFRA / "prometheus"
GRAFANA = INFRA / "grafana"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = INFRA / "docker" / "Dockerfile"

# vLLM metrics the rules, dashboards and autoscalers may use: vLLM >= 0.12 names, plus
# vllm:gpu_cache_usage_perc, the KV-cache gauge's name before (docs.vllm.ai, "Production Metrics").
VLLM_METRICS = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        *(
            f"vllm:{name}_{suffix}"
            for name in (
                "time_to_first_token_seconds",
                "e2e_request_latency_seconds",
                "request_queue_time_seconds",
                "inter_token_latency_seconds",
            )
            for suffix in ("bucket", "sum", "count")
        ),
    }
)
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def _sample_names(family: Metric) -> set[str]:
    if family.type == "counter":
        return {family.name + "_total"}
    if family.type == "histogram":
        return {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {family.name}


@cache
def qwen_metric_names() -> frozenset[str]:
    """Every series name backend/metrics.py can expose (both registries), labelled or not."""
    names: set[str] = set()
    for metrics in (Metrics(), RagMetrics()):
        for family in metrics.registry.collect():
            names |= _sample_names(family)
    return frozenset(names)


def known_metric_names() -> frozenset[str]:
    return qwen_metric_names() | VLLM_METRICS | PROMETHEUS_SERIES


def _settings_fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, bool]]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _settings_fields(annotation, f"{prefix}{name.upper()}__")
        else:
            yield (
                f"{prefix}{name.upper()}",
                "SecretStr" in repr(annotation) or annotation is SecretStr,
            )


@cache
def settings_env_names() -> frozenset[str]:
    """Every environment variable `Settings` reads (QWEN_<GROUP>__<FIELD>)."""
    return frozenset(name for name, _ in _settings_fields(Settings, "QWEN_"))


@cache
def secret_env_names() -> frozenset[str]:
    """The variables of the SecretStr settings (URLs with passwords included)."""
    return frozenset(name for name, secret in _settings_fields(Settings, "QWEN_") if secret)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def env_example() -> dict[str, str]:
    """.env.example's assignments, in order."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$\$")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `$$`.
    Raises KeyError for a required variable that is unset (or empty, with `:?`)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = env.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is None:
            if op and op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg if op else ""
        return value

    return _VAR.sub(one, value)


def interpolate_all(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_all(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_all(value, env) for key, value in node.items()}
    return node


def variables_in(node: Any) -> Iterator[tuple[str, str]]:
    """(name, operator) of every `${...}` in `node`'s strings; operator "" for a bare ${VAR}."""
    if isinstance(node, str):
        for match in _VAR.finditer(node):
            if match.group(1):
                yield match.group(1), match.group(2) or ""
    elif isinstance(node, list):
        for item in node:
            yield from variables_in(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from variables_in(value)


@cache
def k8s_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) of every manifest the kustomization lists, in its order. Shared between
    tests: copy before changing one."""
    docs = []
    for name in load_yaml(K8S / "kustomization.yaml")["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            if doc:
                docs.append((name, doc))
    return tuple(docs)


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc["kind"] == kind]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in k8s_objects(kind) if doc["metadata"]["name"] == name]
    return found


def rules() -> list[dict[str, Any]]:
    """Every rule of infra/prometheus/rules/*.yml."""
    return [
        rule
        for path in sorted((PROMETHEUS / "rules").glob("*.yml"))
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Textbox/constant variables and their default values (the datasource variable excluded)."""
    return {
        v["name"]: str(v["query"])
        for v in dashboard["templating"]["list"]
        if v["type"] in {"textbox", "constant", "custom"}
    }


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every Prometheus query of `dashboard`."""
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def keda_prometheus_queries() -> list[tuple[str, str]]:
    return [
        (obj["metadata"]["name"], trigger["metadata"]["query"])
        for obj in k8s_objects("ScaledObject")
        for trigger in obj["spec"]["triggers"]
        if trigger["type"] == "prometheus"
    ]
