"""Writes the Grafana dashboards in infra/grafana/dashboards/ (the JSON files are what Grafana loads).

    .venv/bin/python infra/grafana/dashboards.py          # rewrite the JSON files
    .venv/bin/python infra/grafana/dashboards.py --check  # exit 1 if they differ from this file

Edit the panels here, not in the JSON: tests/infra/test_grafana.py fails when the two differ, parses
every query with promtool and checks every metric name against backend/metrics.py.

Metric names: backend/metrics.py (namespace qwen; counters `_total`, histograms `_bucket`) and vLLM's
(`vllm:*`). Queries use Grafana's `$__rate_interval`; the cost panels use the dashboard variables
`gpu_hour_price` (price of one GPU-hour) and `gpus_per_replica`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
WIDTH = 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    cost_variables: bool = False
    tags: tuple[str, ...] = field(default=("qwen-stack",))


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def quantiles(metric: str, qs: tuple[float, ...], *, by: str = "") -> tuple[Query, ...]:
    """histogram_quantile of `metric`_bucket for each q, grouped by le (and `by`)."""
    group = f"le, {by}" if by else "le"
    label = f"{{{{{by}}}}} " if by else ""
    return tuple(
        q(
            f"histogram_quantile({v}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
            f"{label}p{round(v * 100)}",
        )
        for v in qs
    )


def ratio(part: str, whole: str) -> str:
    """part / whole of two rates; a part with no series counts as 0 (not as no data)."""
    return f"(sum(rate({part}[{RATE}])) or vector(0)) / sum(rate({whole}[{RATE}]))"


ANSWERED = 'qwen_requests_total{outcome=~"ok|degraded"}'
# Engine replicas that cost money: scraped vLLM pods, else the replicas chat_ui sees healthy.
ENGINE_REPLICAS = '(count(up{job="vllm"} == 1) or count(max by (replica) (qwen_engine_up) == 1))'
COST_PER_1000 = (
    f"$gpu_hour_price * $gpus_per_replica * {ENGINE_REPLICAS}"
    f" / (sum(rate({ANSWERED}[1h])) * 3600 / 1000)"
)
KV_CACHE = "max by (instance) (vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc)"
# Every chat_ui reports the whole (shared) slot table: one value per replica, never summed over
# chat_ui instances.
SLOTS_IN_USE = "max by (replica) (qwen_slots_in_use)"
SLOTS_CAPACITY = "max by (replica) (qwen_slots_capacity)"
SLOT_OCCUPANCY = f"sum({SLOTS_IN_USE}) / (sum({SLOTS_CAPACITY}) > 0)"

COST_ROW = Row(
    "Cost",
    (
        Panel(
            "Cost per 1,000 answered requests",
            (q(COST_PER_1000, "cost / 1k requests"),),
            unit="currencyUSD",
            kind="stat",
            description="gpu_hour_price × gpus_per_replica × engine replicas up, divided by the "
            "answered requests of the last hour, per 1,000.",
            width=8,
        ),
        Panel(
            "Engine replicas up",
            (q(ENGINE_REPLICAS, "replicas"),),
            kind="stat",
            width=8,
        ),
        Panel(
            "Answered requests per hour",
            (q(f"sum(rate({ANSWERED}[1h])) * 3600", "requests / h"),),
            kind="stat",
            width=8,
        ),
    ),
)

CHAT = Dashboard(
    uid="qwen-overview",
    title="Qwen · chat",
    description="chat_ui: traffic, latency, TTFT, tokens, slots and queue, degradation, guard, "
    "rate limits, engines as chat_ui sees them, cost.",
    cost_variables=True,
    rows=(
        Row(
            "Traffic",
            (
                Panel(
                    "Requests by outcome",
                    (q(f"sum by (outcome) (rate(qwen_requests_total[{RATE}]))", "{{outcome}}"),),
                    unit="reqps",
                ),
                Panel(
                    "Error ratio (error + timeout)",
                    (
                        q(
                            ratio(
                                'qwen_requests_total{outcome=~"error|timeout"}',
                                "qwen_requests_total",
                            ),
                            "errors",
                        ),
                    ),
                    unit="percentunit",
                ),
            ),
        ),
        Row(
            "Latency",
            (
                Panel(
                    "Answer latency (message to last token)",
                    quantiles("qwen_answer_seconds", (0.5, 0.9, 0.99)),
                    unit="s",
                ),
                Panel(
                    "Time to first token",
                    quantiles("qwen_time_to_first_token_seconds", (0.5, 0.95, 0.99)),
                    unit="s",
                ),
            ),
        ),
        Row(
            "Tokens",
            (
                Panel(
                    "Tokens per second",
                    (
                        q(f"sum(rate(qwen_prompt_tokens_total[{RATE}]))", "prompt (chat_ui)"),
                        q(
                            f"sum(rate(qwen_completion_tokens_total[{RATE}]))",
                            "completion (chat_ui)",
                        ),
                        q(f"sum(rate(vllm:generation_tokens_total[{RATE}]))", "generated (vLLM)"),
                    ),
                ),
                Panel(
                    "Tokens per answer",
                    (
                        q(
                            f"sum(rate(qwen_prompt_tokens_total[{RATE}]))"
                            f" / sum(rate(qwen_degradation_tier_total[{RATE}]))",
                            "prompt tokens",
                        ),
                        q(
                            f"sum(rate(qwen_completion_tokens_total[{RATE}]))"
                            f" / sum(rate(qwen_degradation_tier_total[{RATE}]))",
                            "completion tokens",
                        ),
                    ),
                    description="Per request that finished (each counts once by tier); the "
                    "tokens of stopped answers count too.",
                ),
            ),
        ),
        Row(
            "Session slots and queue",
            (
                Panel(
                    "Slots in use and capacity",
                    (
                        q(f"sum({SLOTS_IN_USE})", "in use"),
                        q(f"sum({SLOTS_CAPACITY})", "capacity"),
                        q(SLOTS_IN_USE, "in use {{replica}}"),
                    ),
                    description="Live session leases in Redis, read by chat_ui at each scrape; "
                    "capacity counts the replicas chat_ui finds healthy.",
                ),
                Panel(
                    "Slot saturation",
                    (
                        q(SLOT_OCCUPANCY, "slots in use"),
                        q(
                            f'1 - sum(rate(qwen_queue_wait_seconds_bucket{{le="0.5"}}[{RATE}]))'
                            f" / sum(rate(qwen_queue_wait_seconds_count[{RATE}]))",
                            "share waiting > 0.5 s",
                        ),
                        q(
                            ratio('qwen_requests_total{outcome="refused"}', "qwen_requests_total"),
                            "refused",
                        ),
                    ),
                    unit="percentunit",
                    description="Share of slots in use (the QwenSlotsSaturated alert fires over "
                    "90% for 10 min); with every slot taken new turns wait, and past the wait "
                    "budget they are refused.",
                ),
                Panel(
                    "Waiting for a slot",
                    (q("max(qwen_queue_depth)", "queue depth (last seen)"),),
                ),
                Panel(
                    "Queue wait",
                    quantiles("qwen_queue_wait_seconds", (0.5, 0.95)),
                    unit="s",
                ),
            ),
        ),
        Row(
            "Degradation",
            (
                Panel(
                    "Answers by degradation tier",
                    (q(f"sum by (tier) (rate(qwen_degradation_tier_total[{RATE}]))", "{{tier}}"),),
                    unit="reqps",
                ),
                Panel(
                    "Share of answers below the normal tier",
                    (
                        q(
                            f'1 - (sum(rate(qwen_degradation_tier_total{{tier="normal"}}[{RATE}])) or vector(0))'
                            f" / sum(rate(qwen_degradation_tier_total[{RATE}]))",
                            "degraded",
                        ),
                    ),
                    unit="percentunit",
                ),
            ),
        ),
        Row(
            "Guard and answer filters",
            (
                Panel(
                    "Guard blocks",
                    (
                        q(
                            f'sum(rate(qwen_requests_total{{outcome="blocked"}}[{RATE}])) or vector(0)',
                            "blocked",
                        ),
                    ),
                    unit="reqps",
                ),
                Panel(
                    "Guard hits by stage and category",
                    (
                        q(
                            f"sum by (stage, category) (rate(qwen_guard_hits_total[{RATE}]))",
                            "{{stage}} · {{category}}",
                        ),
                    ),
                    unit="ops",
                    description="Texts with a lexicon hit: the user's message (input), each "
                    "retrieved chunk (retrieval), the answer (output: blocked or masked words, "
                    "and prompt_leak for the canary). By severity: qwen_guard_hits_total's "
                    "severity label.",
                ),
                Panel(
                    "Answers sanitized, by kind",
                    (q(f"sum by (kind) (rate(qwen_answer_sanitized_total[{RATE}]))", "{{kind}}"),),
                    unit="ops",
                ),
                Panel(
                    "Citations removed",
                    (q(f"sum(rate(qwen_citations_removed_total[{RATE}]))", "removed"),),
                    unit="ops",
                ),
            ),
        ),
        Row(
            "Rate limits",
            (
                Panel(
                    "Refused by per-user limits, by kind",
                    (q(f"sum by (kind) (rate(qwen_rate_limited_total[{RATE}]))", "{{kind}}"),),
                    unit="reqps",
                    width=24,
                ),
            ),
        ),
        Row(
            "Engines as chat_ui sees them",
            (
                Panel(
                    "Replica health (1 up)",
                    (q("max by (replica) (qwen_engine_up)", "{{replica}}"),),
                    width=8,
                ),
                Panel(
                    "Circuit breakers (1 open)",
                    (q("max by (replica) (qwen_engine_breaker_open)", "{{replica}}"),),
                    width=8,
                ),
                Panel(
                    "Failovers before the first token",
                    (q(f"sum(rate(qwen_engine_failovers_total[{RATE}]))", "failovers"),),
                    unit="ops",
                    width=8,
                ),
                Panel(
                    "Audit write failures (last hour)",
                    (
                        q(
                            "sum by (sink) (increase(qwen_audit_write_failures_total[1h]))",
                            "{{sink}}",
                        ),
                    ),
                    width=24,
                    height=6,
                ),
            ),
        ),
        COST_ROW,
    ),
)

RAG = Dashboard(
    uid="qwen-rag",
    title="Qwen · knowledge base",
    description="RAG worker: uploads, ingestion stage durations, stream lag, dead letters, retrieval.",
    rows=(
        Row(
            "Uploads and documents",
            (
                Panel(
                    "Uploads by outcome",
                    (q(f"sum by (outcome) (rate(qwen_rag_uploads_total[{RATE}]))", "{{outcome}}"),),
                    unit="ops",
                ),
                Panel(
                    "Documents finished by outcome",
                    (
                        q(
                            f"sum by (outcome) (rate(qwen_rag_documents_total[{RATE}]))",
                            "{{outcome}}",
                        ),
                    ),
                    unit="ops",
                ),
            ),
        ),
        Row(
            "Ingestion",
            (
                Panel(
                    "Stage duration p50",
                    quantiles("qwen_rag_ingest_stage_seconds", (0.5,), by="stage"),
                    unit="s",
                ),
                Panel(
                    "Stage duration p95",
                    quantiles("qwen_rag_ingest_stage_seconds", (0.95,), by="stage"),
                    unit="s",
                ),
                Panel(
                    "Ingestion backlog",
                    (
                        q("max(qwen_rag_stream_lag)", "waiting (lag)"),
                        q("max(qwen_rag_stream_pending)", "delivered, unacknowledged"),
                    ),
                    width=8,
                ),
                Panel(
                    "Dead letters (last hour)",
                    (q("sum(increase(qwen_rag_dead_letters_total[1h]))", "dead-lettered"),),
                    width=8,
                ),
                Panel(
                    "Chunks indexed",
                    (q(f"sum(rate(qwen_rag_chunks_indexed_total[{RATE}]))", "chunks"),),
                    unit="ops",
                    width=8,
                ),
            ),
        ),
        Row(
            "Retrieval",
            (
                Panel(
                    "Retrieve latency",
                    quantiles("qwen_rag_retrieve_seconds", (0.5, 0.95, 0.99)),
                    unit="s",
                ),
                Panel(
                    "Retrieve calls",
                    (q(f"sum(rate(qwen_rag_retrieve_seconds_count[{RATE}]))", "calls"),),
                    unit="reqps",
                ),
            ),
        ),
    ),
)

ENGINE = Dashboard(
    uid="qwen-engine",
    title="Qwen · engine (vLLM)",
    description="vLLM replicas (profile gpu / KServe): load, KV cache, prefix cache, latency, "
    "tokens, cost.",
    cost_variables=True,
    rows=(
        Row(
            "Load",
            (
                Panel(
                    "Requests running and waiting",
                    (
                        q("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
                        q("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}"),
                    ),
                ),
                Panel(
                    "KV-cache usage",
                    (q(KV_CACHE, "{{instance}}"),),
                    unit="percentunit",
                    description="The autoscaler adds a replica when the average stays above 75% "
                    "for 2 minutes.",
                ),
                Panel(
                    "Prefix-cache hit rate",
                    (
                        q(
                            f"sum(rate(vllm:prefix_cache_hits_total[{RATE}]))"
                            f" / sum(rate(vllm:prefix_cache_queries_total[{RATE}]))",
                            "hit rate",
                        ),
                    ),
                    unit="percentunit",
                    description="Session slots pin each conversation to one replica so this "
                    "stays high.",
                ),
                Panel(
                    "Preemptions",
                    (q(f"sum(rate(vllm:num_preemptions_total[{RATE}]))", "preemptions"),),
                    unit="ops",
                ),
            ),
        ),
        Row(
            "Latency inside vLLM",
            (
                Panel(
                    "Time to first token",
                    quantiles("vllm:time_to_first_token_seconds", (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "Queue time",
                    quantiles("vllm:request_queue_time_seconds", (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "End-to-end request latency",
                    quantiles("vllm:e2e_request_latency_seconds", (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
            ),
        ),
        Row(
            "Tokens",
            (
                Panel(
                    "Tokens per second",
                    (
                        q(f"sum(rate(vllm:prompt_tokens_total[{RATE}]))", "prompt"),
                        q(f"sum(rate(vllm:generation_tokens_total[{RATE}]))", "generated"),
                    ),
                    width=24,
                ),
            ),
        ),
        COST_ROW,
    ),
)

DASHBOARDS = (CHAT, RAG, ENGINE)


def _panel_json(panel: Panel, *, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend,
            "range": panel.kind == "timeseries",
            "instant": panel.kind == "stat",
        }
        for i, query in enumerate(panel.queries)
    ]
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "stat":
        body["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}
        }
    else:
        body["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        }
    return body


def _variables(dashboard: Dashboard) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "Prometheus", "value": "prometheus"},
            "hide": 0,
        }
    ]
    if dashboard.cost_variables:
        for name, label, value in (
            ("gpu_hour_price", "GPU-hour price (USD)", "2.50"),
            ("gpus_per_replica", "GPUs per engine replica", "1"),
        ):
            variables.append(
                {
                    "name": name,
                    "label": label,
                    "type": "textbox",
                    "query": value,
                    "current": {"text": value, "value": value},
                    "hide": 0,
                }
            )
    return variables


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana JSON model of `dashboard`: rows stacked, panels flowing left to right."""
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for row in dashboard.rows:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id, y = next_id + 1, y + 1
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(_panel_json(panel, panel_id=next_id, x=x, y=y))
            next_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": _variables(dashboard)},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def dump(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the JSON files")
    args = parser.parse_args()
    stale = []
    for dashboard in DASHBOARDS:
        path = args.out / f"{dashboard.uid}.json"
        text = dump(dashboard)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date: " + ", ".join(stale) + " (run infra/grafana/dashboards.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
