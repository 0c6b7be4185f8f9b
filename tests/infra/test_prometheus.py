"""infra/prometheus: promtool accepts the configs and rules, the rule unit tests pass, and every
PromQL expression we ship (rules, dashboards, KEDA triggers) parses and names real metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra import files, promql

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is missing: `make system-deps` installs it (Debian package prometheus)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def shipped_expressions() -> list[tuple[str, str]]:
    """(where, plain PromQL) of every expression: alert rules, dashboard panels, KEDA triggers."""
    found = [(f"rule {rule['alert']}", rule["expr"]) for rule in files.rules()]
    for name, dashboard in files.dashboards().items():
        variables = files.dashboard_variables(dashboard)
        for title, expr in files.dashboard_queries(dashboard):
            found.append((f"{name}: {title}", promql.plain(expr, variables)))
    found += [(f"ScaledObject {name}", expr) for name, expr in files.keda_prometheus_queries()]
    return found


def as_rule_file(expressions: list[tuple[str, str]]) -> dict[str, Any]:
    """A rules file with one recording rule per expression: `promtool check rules` parses each."""
    return {
        "groups": [
            {
                "name": "shipped-expressions",
                "rules": [
                    {"record": f"check:expression_{i}", "expr": expr, "labels": {"where": where}}
                    for i, (where, expr) in enumerate(expressions)
                ],
            }
        ]
    }


@needs_promtool
def test_compose_config_with_its_rules_is_valid(tmp_path: Path) -> None:
    config = files.load_yaml(files.PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]  # where compose mounts them
    config["rule_files"] = [str(files.PROMETHEUS / "rules" / "*.yml")]
    result = promtool("check", "config", str(write_yaml(tmp_path / "prometheus.yml", config)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "rules found" in result.stdout


@needs_promtool
def test_kubernetes_config_is_valid_apart_from_discovery(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery, so the kubernetes_sd_configs blocks
    are swapped for static targets; the relabelling and the rest are checked as written."""
    config = files.load_yaml(files.PROMETHEUS / "prometheus-k8s.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"chat-ui", "rag-worker", "vllm"}
    for job in jobs.values():
        (discovery,) = job.pop("kubernetes_sd_configs")
        assert discovery["role"] == "pod" and discovery["namespaces"]["names"] == ["qwen"]
        job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    config["rule_files"] = [str(files.PROMETHEUS / "rules" / "*.yml")]
    result = promtool("check", "config", str(write_yaml(tmp_path / "prometheus.yml", config)))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rules_are_valid() -> None:
    result = promtool(
        "check", "rules", *map(str, sorted((files.PROMETHEUS / "rules").glob("*.yml")))
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    tests = sorted((files.PROMETHEUS / "tests").glob("*.yml"))
    assert tests
    result = promtool("test", "rules", *map(str, tests))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_cover_every_alert() -> None:
    """Every alert is shown firing, with its rendered text, by at least one promtool test case."""
    tested = {
        case["alertname"]
        for path in (files.PROMETHEUS / "tests").glob("*.yml")
        for test in files.load_yaml(path)["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in files.rules()} == tested


def test_every_alert_has_severity_and_text() -> None:
    for rule in files.rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


@needs_promtool
def test_every_shipped_expression_parses(tmp_path: Path) -> None:
    expressions = shipped_expressions()
    assert len(expressions) > 60
    rules_file = write_yaml(tmp_path / "expressions.yml", as_rule_file(expressions))
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_a_broken_expression_is_caught(tmp_path: Path) -> None:
    rules_file = as_rule_file([("broken", "sum(rate(qwen_requests_total[5m])")])
    result = promtool("check", "rules", str(write_yaml(tmp_path / "broken.yml", rules_file)))
    assert result.returncode != 0 and "parse error" in result.stdout + result.stderr


def test_every_metric_name_exists() -> None:
    known = files.known_metric_names()
    unknown = {
        (where, name)
        for where, expr in shipped_expressions()
        for name in promql.metric_names(expr)
        if name not in known
    }
    assert not unknown


def test_a_misspelt_metric_is_caught() -> None:
    names = promql.metric_names(
        'sum by (outcome) (rate(qwen_request_total{outcome=~"ok|error"}[5m])) '
        "/ on() group_left sum(vllm:num_requests_waiting offset 5m) > bool 0.5"
    )
    assert names == {"qwen_request_total", "vllm:num_requests_waiting"}
    assert "qwen_request_total" not in files.known_metric_names()


def test_registries_name_what_the_rules_use() -> None:
    names = files.qwen_metric_names()
    assert {"qwen_requests_total", "qwen_time_to_first_token_seconds_bucket", "qwen_queue_depth",
            "qwen_rag_stream_lag", "qwen_rag_dead_letters_total"} <= names  # fmt: skip


def test_alert_signals_are_what_the_rule_compares() -> None:
    assert promql.signal("max(qwen_rag_stream_lag) > 20") == "max(qwen_rag_stream_lag)"
    assert promql.signal('absent(up{job="chat-ui"} == 1)') == 'absent(up{job="chat-ui"} == 1)'
    assert promql.signal("1 - a / b > 0.5") == "1 - a / b"


def test_compose_scrape_jobs_reach_the_compose_services() -> None:
    services = files.compose()["services"]
    ports = {"chat-ui": 8000, "rag-worker": 8100, "vllm": 8000}
    config = files.load_yaml(files.PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job, port in ports.items():
        (sd,) = jobs[job]["dns_sd_configs"]
        (name,) = sd["names"]
        assert name in services and sd["port"] == port
    assert (
        "8000" in str(services["vllm"]["command"])
        and services["chat-ui"]["environment"]["QWEN_UI__PORT"] == "8000"
    )
