"""docker-compose.yml and .env.example: valid Compose, every service healthy/non-root/restarting,
data on named volumes, secrets only from the env file, settings that Settings really reads."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from backend.config import UISettings
from tests.infra import files

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|HMAC_KEY|REDISCLI_AUTH")
# Variables compose or the images read that are not QWEN_ settings.
OTHER_VARIABLES = {"COMPOSE_PROFILES", "QWEN_IMAGE_TAG"}


def services() -> dict[str, dict[str, Any]]:
    return files.compose()["services"]


def long_running() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if svc.get("restart") != "no"}


def filled_env() -> dict[str, str]:
    """.env.example with every empty value (the secrets) filled in, as an operator would."""
    return {key: value or f"filled-{key.lower()}-0123456789abcdef0123456789"
            for key, value in files.env_example().items()}  # fmt: skip


def test_valid_against_the_compose_schema() -> None:
    schema = json.loads((files.SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    document = files.interpolate_all(files.compose(), filled_env())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft201909Validator(schema).iter_errors(document)]  # fmt: skip
    assert not errors


def test_schema_rejects_a_misspelt_field() -> None:
    schema = json.loads((files.SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    document = files.interpolate_all(files.compose(), filled_env())
    document["services"]["redis"]["healthcheks"] = document["services"]["redis"].pop("healthcheck")
    assert not jsonschema.Draft201909Validator(schema).is_valid(document)


def test_unedited_env_file_refuses_to_start() -> None:
    """`docker compose up` with .env.example as it is stops at the first empty secret."""
    with pytest.raises(KeyError, match=r"set \w+ in \.env"):
        files.interpolate_all(files.compose(), files.env_example())


def test_every_required_variable_is_in_env_example() -> None:
    listed = set(files.env_example())
    used = dict(files.variables_in(files.compose()))
    assert {name for name, op in used.items() if op in ("", ":?", "?")} <= listed
    assert set(used) <= listed  # defaults documented there too
    assert listed - set(used) <= {"COMPOSE_PROFILES"}  # nothing stale


def test_every_service_has_a_healthcheck() -> None:
    for name, svc in long_running().items():
        check = svc.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), name
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), name


def test_one_shot_services_gate_their_dependents() -> None:
    one_shots = {name for name, svc in services().items() if svc.get("restart") == "no"}
    assert one_shots == {"admin-init"}
    gated = [svc for svc in services().values()
             if svc.get("depends_on", {}).get("admin-init", {}).get("condition") == "service_completed_successfully"]  # fmt: skip
    assert gated


def test_every_service_restarts() -> None:
    for name, svc in long_running().items():
        assert svc.get("restart") in {"unless-stopped", "always"}, name


def test_every_service_runs_as_non_root() -> None:
    for name, svc in services().items():
        user = str(svc.get("user", ""))
        uid = user.split(":")[0]
        assert uid and uid not in {"0", "root"}, name


def test_data_lives_on_named_volumes() -> None:
    declared = set(files.compose()["volumes"])
    for name, svc in services().items():
        for mount in svc.get("volumes", []):
            source, _target, *mode = mount.split(":")
            if source.startswith("./"):
                assert source.startswith("./infra/") and mode == ["ro"], (name, mount)
                assert (files.ROOT / source).exists(), (name, mount)
            else:
                assert source in declared, (name, mount)
    used = {m.split(":")[0] for svc in services().values() for m in svc.get("volumes", [])}
    assert declared <= used


def test_stateful_services_keep_their_data() -> None:
    expected = {"postgres": "/var/lib/postgresql/data", "redis": "/data",
                "prometheus": "/prometheus", "grafana": "/var/lib/grafana"}  # fmt: skip
    for name, path in expected.items():
        targets = {m.split(":")[1] for m in services()[name]["volumes"]}
        assert path in targets, name


def test_redis_is_7_with_aof_and_no_eviction() -> None:
    redis = services()["redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-\w+)?", redis["image"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert '--requirepass "$$REDIS_PASSWORD"' in command


def test_third_party_images_are_pinned() -> None:
    for name, svc in services().items():
        if "build" in svc:
            continue
        image = svc["image"]
        assert re.search(r":v?\d+\.\d+", image) and "latest" not in image, name
    assert services()["postgres"]["image"].startswith("pgvector/pgvector:") and services()[
        "postgres"
    ]["image"].endswith("-pg16")


def secret_values(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    assert isinstance(env, dict)
    return {key: str(value) for key, value in env.items()
            if SECRET_NAME.search(key) or key in files.secret_env_names()}  # fmt: skip


def test_no_literal_secrets() -> None:
    for name, svc in services().items():
        for key, value in secret_values(svc).items():
            assert "${" in value, (name, key)
            literal = re.sub(r"\$\{[^}]*\}", "", value)
            userinfo = re.search(r"://([^@/]*)@", literal)
            assert userinfo is None or userinfo.group(1).endswith(":"), (name, key)  # no password
            if key not in files.secret_env_names():
                assert re.fullmatch(r"\$\{[^}]*\}", value), (name, key)


def test_env_example_lists_every_secret_setting_empty() -> None:
    example = files.env_example()
    composed = {"QWEN_DATABASE__URL": "POSTGRES_PASSWORD", "QWEN_REDIS__URL": "REDIS_PASSWORD"}
    for name in files.secret_env_names():
        key = composed.get(name, name)
        assert key in example and example[key] == "", name
    assert "production" in files.ENV_EXAMPLE.read_text(encoding="utf-8")


def test_qwen_variables_are_real_settings() -> None:
    known = files.settings_env_names()
    for name, svc in services().items():
        for key in svc.get("environment", {}):
            if key.startswith("QWEN_"):
                assert key in known, (name, key)
    for key in files.env_example():
        if key.startswith("QWEN_") and key not in OTHER_VARIABLES:
            assert key in known, key


def test_processes_run_in_production_mode() -> None:
    for name in ("chat-ui", "rag-worker", "admin-init"):
        env = services()[name]["environment"]
        assert env["QWEN_MODE"] == "production", name
        for secret in ("QWEN_UI__AUTH_SECRET", "QWEN_UI__ADMIN_PASSWORD",
                       "QWEN_RAG__SERVICE_TOKEN", "QWEN_AUDIT__HMAC_KEY"):  # fmt: skip
            assert secret in env, (name, secret)


def test_wiring_between_services() -> None:
    env = files.interpolate_all(services()["chat-ui"]["environment"], filled_env())
    assert env["QWEN_LLM__BASE_URL"] == "http://engine:8000/v1"
    assert env["QWEN_RAG__WORKER_URL"] == "http://rag-worker:8100"
    assert env["QWEN_DATABASE__URL"].endswith("@postgres:5432/qwen")
    assert env["QWEN_REDIS__URL"].endswith("@redis:6379/0")


def test_engine_profiles() -> None:
    cpu, gpu = services()["engine-cpu"], services()["vllm"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    for svc in (cpu, gpu):
        assert svc["networks"]["default"]["aliases"] == ["engine"]
    assert cpu["build"]["target"] == "engine" and cpu["environment"]["QWEN_ENGINE__PORT"] == "8000"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["VLLM_IMAGE"] == "vllm/vllm-openai:v0.18.0"


VLLM_FLAGS = {"--enable-prefix-caching", "--max-model-len", "--gpu-memory-utilization",
              "--max-num-seqs", "--scheduling-policy", "--shutdown-timeout"}  # fmt: skip


def flags(args: list[str]) -> dict[str, str]:
    return {arg.split("=")[0]: arg.partition("=")[2] for arg in args if arg.startswith("--")}


def test_vllm_flags() -> None:
    vllm = files.interpolate_all(services()["vllm"], filled_env())
    given = flags(vllm["command"])
    assert set(given) >= VLLM_FLAGS
    assert given["--scheduling-policy"] == "priority"
    assert given["--max-model-len"] == filled_env()["QWEN_ENGINE__N_CTX"]


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match.group(1))


def test_stop_grace_outlasts_the_drain() -> None:
    env = filled_env()
    vllm = files.interpolate_all(services()["vllm"], env)
    assert seconds(vllm["stop_grace_period"]) > int(flags(vllm["command"])["--shutdown-timeout"])
    # chat_ui's own drain, then uvicorn's graceful shutdown (qwen-stack ui)
    assert seconds(services()["chat-ui"]["stop_grace_period"]) > UISettings().drain_s + 15
    assert seconds(services()["rag-worker"]["stop_grace_period"]) > 30


def test_only_the_ui_is_published_beyond_monitoring() -> None:
    published = {name for name, svc in services().items() if svc.get("ports")}
    assert published == {"chat-ui", "prometheus", "grafana"}
    for name in published:
        (port,) = services()[name]["ports"]
        assert port.startswith("${") and "127.0.0.1" in port, name  # local unless .env says so
