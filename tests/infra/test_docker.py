"""infra/docker: the Dockerfiles build what compose asks for, from pinned bases, as non-root users,
with the dependency pins of pyproject.toml. (No Docker engine here: the files are read, not built.)"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

from tests.infra import files

VLLM_DOCKERFILE = files.INFRA / "docker" / "vllm.Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [arg for kw, arg in self.instructions if kw == keyword]
        return found[-1] if found else None

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of a Dockerfile; continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            current = Stage(name=name.strip() or base, base=base.strip())
            stages[current.name] = current
        elif current is None and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif current is not None:
            current.instructions.append((keyword, rest))
    return args, stages


def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse(files.DOCKERFILE.read_text(encoding="utf-8"))


def test_compose_targets_exist() -> None:
    _, stages = dockerfile()
    for name, svc in files.compose()["services"].items():
        build = svc.get("build")
        if build and build["dockerfile"] == "infra/docker/Dockerfile":
            assert build["context"] == "." and build["target"] in stages, name


def test_base_image_is_pinned() -> None:
    args, stages = dockerfile()
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    assert stages["base"].base == "${PYTHON_IMAGE}"
    vllm_args, _ = parse(VLLM_DOCKERFILE.read_text(encoding="utf-8"))
    assert vllm_args["VLLM_IMAGE"] == "vllm/vllm-openai:v0.18.0"


def test_runtime_images_are_non_root_and_healthchecked() -> None:
    _, stages = dockerfile()
    for target in ("ui", "rag", "engine"):
        stage = stages[target]
        assert stage.last("USER") == "10001:10001", target
        assert stage.last("HEALTHCHECK"), target
        assert "qwen-stack" in (stage.last("CMD") or ""), target
        # No compiler in a runtime image: the venv is copied from a build stage.
        assert any("--from=build-" in arg and "/opt/venv" in arg for arg in stage.all("COPY")), (
            target
        )
    _, vllm = parse(VLLM_DOCKERFILE.read_text(encoding="utf-8"))
    (only,) = vllm.values()
    assert only.last("USER") == "10002:10002"


def test_compose_users_match_the_images() -> None:
    services = files.compose()["services"]
    for name in ("chat-ui", "rag-worker", "engine-cpu", "admin-init"):
        assert services[name]["user"] == "10001:10001", name
    assert services["vllm"]["user"] == "10002:10002"


def test_copied_sources_exist() -> None:
    _, stages = dockerfile()
    for stage in stages.values():
        for arg in stage.all("COPY"):
            if arg.startswith("--from"):
                continue
            *sources, _ = arg.split()
            for source in sources:
                assert (files.ROOT / source).exists(), source


def test_torch_cpu_is_installed_first_at_the_pinned_version() -> None:
    _, stages = dockerfile()
    runs = " ".join(stages["build-rag"].all("RUN"))
    assert '"torch==${TORCH_VERSION}"' in runs and runs.index("torch==") < runs.index("[rag]")
    assert "TORCH_VERSION=2.13.0" in stages["build-rag"].all("ARG")
    assert "download.pytorch.org/whl/cpu" in " ".join(stages["build-rag"].all("ARG"))


def test_llama_cpp_pin_matches_pyproject() -> None:
    pyproject = tomllib.loads((files.ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (spec,) = [
        s
        for s in pyproject["project"]["optional-dependencies"]["cpu"]
        if s.startswith("llama-cpp-python")
    ]
    _, stages = dockerfile()
    assert f'"{spec}"' in " ".join(stages["build-engine"].all("RUN"))


def test_build_context_is_limited() -> None:
    ignore = (files.INFRA / "docker" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    lines = [line for line in ignore.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "**"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    _, stages = dockerfile()
    copied = {source.rstrip("/") for stage in stages.values() for arg in stage.all("COPY")
              if not arg.startswith("--from") for source in arg.split()[:-1]}  # fmt: skip
    assert copied <= included
