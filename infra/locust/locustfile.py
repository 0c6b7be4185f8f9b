"""Load test of chat_ui: Chinese multi-turn conversations over the Chainlit websocket.

    .venv/bin/locust -f infra/locust/locustfile.py --host https://chat.example.com --headless \
        -u 50 -r 2 --run-time 10m --qwen-users users.txt \
        --slo-ttft-p95 2.0 --slo-answer-p95 20 --slo-error-ratio 0.01 --chart load.png

With --conversations N the run ends after N conversations instead of at --run-time.
Each simulated user logs in (one login per simulated user, from --qwen-users: `name:password` per
line, or QWEN_LOCUST_USERS; the per-user rate limits apply to each), opens a conversation (the plain
chat, or 知识库问答 for --kb-share of them), asks its turns one after another as a person would, and
closes it. Every turn is reported twice: `ttft` (message sent to first answer text) and `answer`
(to the end of the turn), in milliseconds. At the end the run checks the SLOs -- p95 TTFT, p95 answer
time, error ratio -- prints one JSON line (`{"slo": {...}, "passed": ...}`), exits 1 if one is
missed, and writes a PNG with latency percentiles and throughput over time (--chart).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import gevent
from chainlit_client import KB_PROFILE, ChainlitSession, ChatError, login
from locust import User, between, events, task
from locust.exception import StopUser

CONVERSATIONS = (
    ("你好，请用两三句话介绍一下你自己。", "你能帮我做哪些事情？", "好的，谢谢！"),
    (
        "我下个月去杭州出差三天，有什么建议？",
        "西湖附近住哪里比较方便？",
        "当地有什么必吃的杭帮菜？",
    ),
    (
        "帮我写一段给客户的道歉邮件，货物延迟了一周。",
        "语气再正式一点。",
        "最后加一句感谢对方的耐心。",
    ),
    ("解释一下什么是向量数据库。", "它和传统的关系型数据库有什么区别？", "举一个实际应用的例子。"),
    ("把这句话翻译成英文：今天的会议改到下午三点。", "再翻译成日文。", "谢谢。"),
    ("我最近睡眠不太好，有什么改善的办法？", "晚上喝咖啡影响大吗？", "好的，我试试看。"),
)
KB_CONVERSATIONS = (
    ("出差住宿的标准是多少？", "一线城市和其他城市有什么不同？"),
    ("年假有几天？", "入职不满一年可以休年假吗？"),
    ("报销需要哪些材料？", "发票丢了怎么办？"),
)
BINS = 30  # chart: about this many time bins over the run, each at least 1 s


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("qwen-stack")
    group.add_argument(
        "--qwen-users", default="", help="file of name:password lines (or QWEN_LOCUST_USERS)"
    )
    group.add_argument(
        "--kb-share", type=float, default=0.3, help="share of knowledge-base conversations"
    )
    group.add_argument(
        "--think-s", type=float, default=3.0, help="mean pause between turns (reading)"
    )
    group.add_argument("--slo-ttft-p95", type=float, default=2.0, help="seconds")
    group.add_argument("--slo-answer-p95", type=float, default=30.0, help="seconds")
    group.add_argument("--slo-error-ratio", type=float, default=0.01)
    group.add_argument(
        "--conversations", type=int, default=0, help="stop after this many (0: run time)"
    )
    group.add_argument("--chart", default="locust-qwen.png", help="PNG written at the end")
    group.add_argument("--summary", default="", help="also write the JSON summary to this file")


def _credentials(options: Any) -> list[tuple[str, str]]:
    text = Path(options.qwen_users).read_text(encoding="utf-8") if options.qwen_users else ""
    text = text or os.environ.get("QWEN_LOCUST_USERS", "").replace(",", "\n")
    pairs = [
        line.split(":", 1)
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if not pairs:
        raise SystemExit(
            "no logins: pass --qwen-users FILE (name:password lines) or QWEN_LOCUST_USERS"
        )
    return [(name.strip(), password.strip()) for name, password in pairs]


class _Samples:
    """Every turn's (finished at, name, ms, failed), for the chart and the SLO check."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, str, float, bool]] = []
        self.started = time.time()
        self._lock = threading.Lock()

    def add(self, name: str, ms: float, *, failed: bool) -> None:
        with self._lock:
            self.rows.append((time.time(), name, ms, failed))


SAMPLES = _Samples()
_LOGINS: itertools.cycle[tuple[str, str]] | None = None
_COUNTS = {"started": 0, "finished": 0}  # conversations (greenlets: no lock needed)


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    global _LOGINS
    _LOGINS = itertools.cycle(_credentials(environment.parsed_options))
    SAMPLES.started = time.time()


@events.request.add_listener
def _record(name: str, response_time: float, exception: Any = None, **_: Any) -> None:
    SAMPLES.add(name, response_time, failed=exception is not None)


class ChatUser(User):
    """A person chatting: one conversation at a time, a pause to read each answer."""

    wait_time = between(1, 5)  # between conversations

    def on_start(self) -> None:
        assert _LOGINS is not None
        self.login_name, password = next(_LOGINS)
        self.token = login(self.host.rstrip("/"), self.login_name, password)

    def _report(
        self, name: str, started: float, seconds: float | None, error: Exception | None
    ) -> None:
        self.environment.events.request.fire(
            request_type="WS", name=name, response_time=(seconds if seconds is not None else time.perf_counter() - started) * 1000,
            response_length=0, exception=error, context={"user": self.login_name},
        )  # fmt: skip

    @task
    def converse(self) -> None:
        options = self.environment.parsed_options
        if options.conversations and _COUNTS["started"] >= options.conversations:
            raise StopUser()
        _COUNTS["started"] += 1
        try:
            self._converse(options)
        finally:
            _COUNTS["finished"] += 1
            if _COUNTS["finished"] == options.conversations and self.environment.runner:
                gevent.spawn_later(0.1, self.environment.runner.quit)

    def _converse(self, options: Any) -> None:
        kb = random.random() < options.kb_share  # noqa: S311 - load mix, not security
        turns = random.choice(KB_CONVERSATIONS if kb else CONVERSATIONS)  # noqa: S311
        session = ChainlitSession(
            self.host, token=self.token, user=self.login_name, profile=KB_PROFILE if kb else ""
        )
        started = time.perf_counter()
        try:
            session.open()
        except ChatError as exc:
            self._report("connect", started, None, exc)
            return
        try:
            for text in turns:
                started = time.perf_counter()
                try:
                    answer = session.ask(text)
                except ChatError as exc:
                    self._report("answer", started, None, exc)
                    return
                failure = None
                if answer.disconnected:
                    failure = ChatError("the server closed the connection mid-answer")
                elif answer.error is not None:  # refused, blocked, rate limited, engine failure
                    failure = ChatError(f"error notice: {answer.error[:80]}")
                elif answer.ttft_s is None:
                    failure = ChatError("no answer text")
                self._report("ttft", started, answer.ttft_s, failure)
                self._report("answer", started, answer.total_s, failure)
                time.sleep(random.expovariate(1 / options.think_s))
        finally:
            session.close()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(rows: list[tuple[float, str, float, bool]], options: Any) -> dict[str, Any]:
    """The SLO verdicts of a run's samples (milliseconds in, seconds out)."""
    ok = {
        name: [ms / 1000 for _, n, ms, failed in rows if n == name and not failed]
        for name in ("ttft", "answer")
    }
    answers = [row for row in rows if row[1] == "answer"]
    errors = sum(1 for row in rows if row[3] and row[1] in {"answer", "connect"})
    ratio = errors / len(answers) if answers else 1.0
    slo = {
        "ttft_p95_s": {"value": _percentile(ok["ttft"], 0.95), "max": options.slo_ttft_p95},
        "answer_p95_s": {"value": _percentile(ok["answer"], 0.95), "max": options.slo_answer_p95},
        "error_ratio": {"value": ratio, "max": options.slo_error_ratio},
    }
    for verdict in slo.values():
        verdict["met"] = verdict["value"] is not None and verdict["value"] <= verdict["max"]
    return {
        "turns": len(answers),
        "errors": errors,
        "slo": slo,
        "passed": all(v["met"] for v in slo.values()),
    }


def chart(rows: list[tuple[float, str, float, bool]], started: float, path: Path) -> None:
    """TTFT and answer-time percentiles (p50/p95/p99) and answers per second, per time bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ended = max((row[0] for row in rows), default=started)
    window = max(1, round((ended - started) / BINS))
    bins: dict[int, dict[str, list[float]]] = {}
    for at, name, ms, failed in rows:
        if name in {"ttft", "answer"} and not failed:
            slot = bins.setdefault(int((at - started) // window), {"ttft": [], "answer": []})
            slot[name].append(ms / 1000)
    keys = sorted(bins)
    x = [k * window for k in keys]
    centres = [value + window / 2 for value in x]
    figure, (latency, throughput) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, style in (("ttft", "o-"), ("answer", "s--")):
        for q, color in ((0.5, "tab:green"), (0.95, "tab:orange"), (0.99, "tab:red")):
            y = [_percentile(bins[k][name], q) for k in keys]
            latency.plot(
                centres, [v if v is not None else float("nan") for v in y], style, color=color,
                markersize=3, label=f"{name} p{round(q * 100)}",
            )  # fmt: skip
    latency.set_ylabel("seconds")
    latency.set_ylim(bottom=0)
    latency.set_title("qwen-stack chat: latency percentiles (ttft solid, answer dashed)")
    latency.legend(ncol=2, fontsize="small")
    latency.grid(alpha=0.3)
    rates = [len(bins[k]["answer"]) / window for k in keys]
    throughput.bar(x, rates, width=window * 0.8, align="edge")
    throughput.set_ylabel("answers / s")
    throughput.set_xlabel(f"seconds since start ({window} s bins)")
    throughput.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@events.quitting.add_listener
def _finish(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    result = summary(list(SAMPLES.rows), options)
    chart(list(SAMPLES.rows), SAMPLES.started, Path(options.chart))
    line = json.dumps(result, ensure_ascii=False)
    if options.summary:
        Path(options.summary).write_text(line + "\n", encoding="utf-8")
    print(line)
    if not result["passed"]:
        environment.process_exit_code = 1
