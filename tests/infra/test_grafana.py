"""infra/grafana: the JSON dashboards are what infra/grafana/dashboards.py writes, are well formed
for Grafana, use only defined variables, and together plot every metric backend/metrics.py has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.infra import files, promql

GENERATOR = files.GRAFANA / "dashboards.py"


def generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args], capture_output=True, text=True, timeout=60
    )


def test_json_matches_the_generator() -> None:
    result = generator("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generator_check_notices_a_hand_edit(tmp_path: Path) -> None:
    assert generator("--out", str(tmp_path)).returncode == 0
    edited = tmp_path / "qwen-rag.json"
    edited.write_text(edited.read_text(encoding="utf-8").replace("p95", "p96"), encoding="utf-8")
    result = generator("--check", "--out", str(tmp_path))
    assert result.returncode == 1 and "qwen-rag.json" in result.stdout


def test_dashboards_are_the_expected_three() -> None:
    boards = files.dashboards()
    assert set(boards) == {"qwen-overview.json", "qwen-rag.json", "qwen-engine.json"}
    assert len({board["uid"] for board in boards.values()}) == 3


def test_panels_are_well_formed() -> None:
    for name, board in files.dashboards().items():
        panels = list(files.dashboard_panels(board))
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids)), name
        for panel in panels:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, (name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["type"] in {"timeseries", "stat"}
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), (name, panel["title"])


def test_panels_do_not_overlap() -> None:
    for name, board in files.dashboards().items():
        taken: set[tuple[int, int]] = set()
        for panel in files.dashboard_panels(board):
            grid = panel["gridPos"]
            cells = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not cells & taken, (name, panel["title"])
            taken |= cells


def test_every_variable_used_is_defined() -> None:
    checked = 0
    for board in files.dashboards().values():
        variables = files.dashboard_variables(board)
        for _, expr in files.dashboard_queries(board):
            assert promql.plain(expr, variables)  # raises KeyError for an undefined one
            checked += 1
    assert checked > 0


def test_cost_uses_the_gpu_hour_price_variable() -> None:
    for name in ("qwen-overview.json", "qwen-engine.json"):
        board = files.dashboards()[name]
        assert files.dashboard_variables(board)["gpu_hour_price"] == "2.50"
        cost = [expr for title, expr in files.dashboard_queries(board) if title.startswith("Cost")]
        assert cost and "$gpu_hour_price" in cost[0] and "/ 1000" in cost[0]


def family(name: str) -> str:
    """The metric a series belongs to: qwen_answer_seconds for qwen_answer_seconds_bucket."""
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_every_qwen_metric_is_on_a_dashboard() -> None:
    plotted = {
        family(name)
        for board in files.dashboards().values()
        for _, expr in files.dashboard_queries(board)
        for name in promql.metric_names(promql.plain(expr, files.dashboard_variables(board)))
    }
    assert {family(name) for name in files.qwen_metric_names()} <= plotted


def test_provisioning_points_at_the_dashboards() -> None:
    provider = files.load_yaml(files.GRAFANA / "provisioning" / "dashboards" / "qwen.yml")
    (entry,) = provider["providers"]
    mount = next(
        volume for volume in files.compose()["services"]["grafana"]["volumes"]
        if volume.startswith("./infra/grafana/dashboards:")
    )  # fmt: skip
    assert mount.split(":")[1] == entry["options"]["path"]
    (source,) = files.load_yaml(files.GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
