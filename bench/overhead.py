"""Pipeline overhead benchmark: what our chat pipeline adds to a stream, against LiteLLM's proxy.

    .venv/bin/python bench/overhead.py [--streams 1,32,128] [--rounds 20,24,5] [--tokens 64]
                                       [--pace-ms 20] [--slots 0] [--no-litellm]

One scripted fake engine (backend/devtools/fake_engine.py, its own process) answers every request
with the same --tokens one-character chunks, --pace-ms apart. At each concurrency level, rounds of
--streams simultaneous streams go through each side in turn (the order rotates every round):

    direct          the `openai` client (AsyncOpenAI, its default connection limits) to the engine
    ours            the ChatPipeline of chat_ui/runtime.py's Runtime.start (EnginePool, guard, rate
                    limits, slots, queue, history on embedded Redis, audit log on embedded
                    PostgreSQL, shaping with the engine tokenizer; sentiment and warm-up off),
                    consumed in-process as chat_ui's on_message consumes it; every message from a
                    new user on a new conversation
    ours_no_guard   the same pipeline without the guard, to split the guard's hold-back from the rest
    litellm         LiteLLM's proxy (bench/.venv-litellm, created on first use from
                    bench/peer_requirements_litellm.txt) in front of the same engine, same client

The direct and LiteLLM sides send exactly the request the pipeline sent (read back from the fake
engine's log: system prompt as the pipeline extends it, one user message, shaped max_tokens and
sampling). TTFT is call → first non-empty text; gaps are between consecutive text arrivals.
"Added" = a side's quantile − the direct client's, over the same rounds. Slots per replica are
raised to twice the largest level so the queue never holds anyone back: this measures overhead, not
admission. bench/README.md has the details. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
LITELLM_VENV = BENCH_DIR / ".venv-litellm"
LITELLM_REQUIREMENTS = BENCH_DIR / "peer_requirements_litellm.txt"
SIDES = ("direct", "ours", "ours_no_guard", "litellm")
MODEL = "qwen"
USER_TEXT = "请用几句话介绍一下杭州西湖的春天。"
ANSWER_SOURCE = (
    "西湖位于杭州城西，三面环山，一面临城。春天的西湖桃红柳绿，苏堤春晓是西湖十景之首，"
    "湖光山色相映成趣，游人泛舟湖上，可以看到远处的雷峰塔和保俶塔。"
)
PAUSE_S = 0.2  # idle before every batch, so the previous one's tail work is done


class GcPauses:
    """Garbage collections of the bench process during measured batches, by side."""

    def __init__(self) -> None:
        self.side: str | None = None
        self.count: dict[str, int] = {}
        self.ms: dict[str, float] = {}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if self.side is None:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.count[self.side] = self.count.get(self.side, 0) + 1
        elapsed = (time.perf_counter() - self._started) * 1000
        self.ms[self.side] = self.ms.get(self.side, 0.0) + elapsed

    def summary(self) -> dict[str, Any]:
        return {side: {"collections": n, "ms": round(self.ms[side], 1)}
                for side, n in self.count.items()}  # fmt: skip


GC_PAUSES = GcPauses()
READY_TIMEOUT_S = 180.0

log = logging.getLogger("bench.overhead")


@dataclass(frozen=True)
class Stream:
    ttft_s: float
    gaps_s: tuple[float, ...]
    text: str
    degraded: bool = False  # ours: the pipeline chose a reduced tier (Outcome.DEGRADED)


@dataclass
class Samples:
    streams: list[Stream] = field(default_factory=list)
    wrong: int = 0  # streams whose text was not exactly the scripted answer
    degraded: int = 0
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- processes


def spawn(
    argv: list[str], *, log_name: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with (CACHE / log_name).open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_http(url: str, process: subprocess.Popen[bytes], *, what: str) -> None:
    """Until GET `url` answers 200; raises RuntimeError if `process` exits or time runs out."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{what} was not ready within {READY_TIMEOUT_S:.0f} s")


def ensure_litellm_venv() -> tuple[Path, str]:
    """bench/.venv-litellm with the pinned LiteLLM proxy: its `litellm` command and version."""
    command = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / ".installed"
    wanted = LITELLM_REQUIREMENTS.read_text()
    if marker.exists() and marker.read_text() == wanted:
        return command, installed_version()
    log.info("creating %s (first use, ~2 min)", LITELLM_VENV)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    done = subprocess.run([*pip, "-r", str(LITELLM_REQUIREMENTS)], stdout=sys.stderr,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
        raise RuntimeError("pip could not install the LiteLLM proxy: " + " | ".join(lines[-2:]))
    marker.write_text(wanted)
    return command, installed_version()


def installed_version() -> str:
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    python = str(LITELLM_VENV / "bin" / "python")
    return subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()


@contextlib.asynccontextmanager
async def litellm_proxy(engine_url: str) -> AsyncIterator[tuple[str, str]]:
    """LiteLLM's proxy in front of the engine: (base URL ending in /v1, version)."""
    from cpu_engine import free_port

    command, version = await asyncio.to_thread(ensure_litellm_venv)
    config = CACHE / "litellm-overhead.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {engine_url}\n"
        "      api_key: EMPTY\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CI"}}
    env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
            "DISABLE_SCHEMA_UPDATE": "True"}  # fmt: skip
    argv = [str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]  # fmt: skip
    process = spawn(argv, log_name="litellm-overhead.log", env=env)
    try:
        await wait_http(f"http://127.0.0.1:{port}/health/liveliness", process, what="litellm")
        yield f"http://127.0.0.1:{port}/v1", version
    finally:
        stop(process)


# ---------------------------------------------------------------- the sides


async def openai_stream(client: Any, body: dict[str, Any]) -> Stream:
    """One streamed chat completion through the `openai` client."""
    stamps: list[float] = []
    parts: list[str] = []
    started = time.perf_counter()
    chunks = await client.chat.completions.create(**body, stream=True)
    async for chunk in chunks:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            stamps.append(time.perf_counter())
            parts.append(delta)
    return finish(started, stamps, parts)


async def pipeline_stream(pipeline: Any, threads: list[str]) -> Stream:
    """One answer through the pipeline, on a new conversation, as chat_ui's on_message reads it."""
    from backend.chat.events import Done, Outcome, Token
    from backend.chat.pipeline import Turn

    thread = f"bench-{uuid.uuid4().hex}"
    threads.append(thread)
    # A new user each time, as many users each sending one message: the rate limits run (their
    # Redis scripts are part of the cost) with the default limits, and never refuse.
    turn = Turn(thread_id=thread, text=USER_TEXT, user=f"user-{uuid.uuid4().hex[:12]}")
    stamps: list[float] = []
    parts: list[str] = []
    done: Done | None = None
    started = time.perf_counter()
    async for event in pipeline.answer(turn):
        if isinstance(event, Token):
            stamps.append(time.perf_counter())
            parts.append(event.text)
        elif isinstance(event, Done):
            done = event
    if done is None or done.outcome not in (Outcome.OK, Outcome.DEGRADED):
        raise RuntimeError(f"pipeline answer ended {done}")
    stream = finish(started, stamps, parts)
    return Stream(stream.ttft_s, stream.gaps_s, stream.text, done.outcome is Outcome.DEGRADED)


def without_guard(pipeline: Any) -> Any:
    """The same pipeline object graph (pool, slots, queue, limiter, audit...) without the guard:
    a diagnostic split of `ours`, whose time to first token the guard's hold-back dominates."""
    if getattr(pipeline, "_guard", None) is None:
        raise RuntimeError("ChatPipeline no longer keeps its guard in `_guard`; update the bench")
    variant = copy.copy(pipeline)
    variant._guard = None
    variant._background = set()
    return variant


async def audit_count(rt: Any) -> int | None:
    """Rows in the audit table, to show the audit log ran (None if the table is not found)."""
    try:
        async with rt.pool.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM audit_log")).fetchone()
    except Exception:  # a renamed table must not sink the run
        return None
    return int(row[0]) if row else None


async def sent_request(engine_root: str) -> dict[str, Any]:
    """The chat request the engine last received (the pipeline's: system prompt with whatever the
    pipeline adds to it, shaped max_tokens and sampling), as `openai` client arguments."""
    async with httpx.AsyncClient(trust_env=False) as admin:
        exchanges = (await admin.get(f"{engine_root}/_fake/log")).raise_for_status().json()
    sent: dict[str, Any] = exchanges[-1]["body"]
    known = {"messages", "max_tokens", "temperature", "top_p", "presence_penalty", "stop"}
    extra = {
        k: v for k, v in sent.items() if k not in known | {"model", "stream", "stream_options"}
    }
    return {"model": MODEL, **{k: v for k, v in sent.items() if k in known}} | (
        {"extra_body": extra} if extra else {}
    )


def finish(started: float, stamps: list[float], parts: list[str]) -> Stream:
    if not stamps:
        raise RuntimeError("no text arrived")
    gaps = tuple(b - a for a, b in itertools.pairwise(stamps))
    return Stream(stamps[0] - started, gaps, "".join(parts))


@dataclass
class Bench:
    engine_root: str  # the fake engine's server root (no /v1)
    answer: str
    pace_s: float
    runs: dict[str, Callable[[list[str]], Awaitable[Stream]]]
    release: Callable[[list[str]], Awaitable[None]]

    async def batch(self, side: str, count: int, into: Samples | None) -> None:
        """`count` simultaneous streams through `side`; recorded in `into` (None: warm-up)."""
        async with httpx.AsyncClient(trust_env=False) as admin:
            (await admin.post(f"{self.engine_root}/_fake/reset")).raise_for_status()
            step = {"text": self.answer, "token_delay_s": self.pace_s}
            response = await admin.post(f"{self.engine_root}/_fake/script", json=[step] * count)
            response.raise_for_status()
        # Every side runs in this one process (`ours` in-process, the others' clients), so the
        # garbage one batch leaves (the `openai` SDK's pydantic models per chunk, above all) would
        # be collected during the next batch, whichever side it is: the swap of two sides'
        # places in the rotation moved 4 ms of 1-stream TTFT with them. Collected here, in the
        # pause, it is billed to no one.
        gc.collect()
        await asyncio.sleep(PAUSE_S)
        threads: list[str] = []
        run = self.runs[side]
        GC_PAUSES.side = side if into is not None else None
        try:
            results = await asyncio.gather(*(run(threads) for _ in range(count)),
                                           return_exceptions=True)  # fmt: skip
        finally:
            GC_PAUSES.side = None
        await self.release(threads)
        if into is None:
            return
        for result in results:
            if isinstance(result, BaseException):
                into.errors.append(f"{type(result).__name__}: {result}"[:200])
            else:
                into.streams.append(result)
                into.wrong += result.text != self.answer
                into.degraded += result.degraded


# ---------------------------------------------------------------- the run


def quantile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); the one value when there is one."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(samples: Samples) -> dict[str, Any]:
    ttft = [s.ttft_s * 1000 for s in samples.streams]
    gaps = [g * 1000 for s in samples.streams for g in s.gaps_s]
    if not ttft:
        return {"streams": 0, "errors": samples.errors[:3], "error_count": len(samples.errors)}
    return {
        "streams": len(ttft), "wrong_text": samples.wrong, "degraded": samples.degraded, "error_count": len(samples.errors),
        "errors": sorted(set(samples.errors))[:3],
        "ttft_ms_p50": round(statistics.median(ttft), 2), "ttft_ms_p99": round(quantile(ttft, 99), 2),
        "gap_ms_p50": round(statistics.median(gaps), 2) if gaps else None,
        "gap_ms_p99": round(quantile(gaps, 99), 2) if gaps else None,
        "text_arrivals_per_stream": round(statistics.mean(len(s.gaps_s) + 1 for s in samples.streams), 1),
    }  # fmt: skip


def added(side: dict[str, Any], direct: dict[str, Any]) -> dict[str, float | None]:
    def minus(key: str) -> float | None:
        if side.get(key) is None or direct.get(key) is None:
            return None
        return round(float(side[key]) - float(direct[key]), 2)

    return {"added_ttft_ms_p50": minus("ttft_ms_p50"), "added_ttft_ms_p99": minus("ttft_ms_p99"),
            "added_gap_ms_p99": minus("gap_ms_p99")}  # fmt: skip


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs <= 0:
        return None
    return round(ours / theirs, 3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from cpu_engine import free_port
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    from backend.config import LLMSettings, ServingSettings, Settings
    from backend.embedded import EmbeddedServices
    from backend.guard import LexiconStore
    from chat_ui.runtime import Runtime
    from chat_ui.server import GC_THRESHOLDS

    levels = [int(x) for x in args.streams.split(",")]
    rounds = [int(x) for x in args.rounds.split(",")]
    if len(rounds) != len(levels):
        raise SystemExit("--rounds needs one count per --streams level")
    answer = (ANSWER_SOURCE * (args.tokens // len(ANSWER_SOURCE) + 1))[: args.tokens]
    pace_s = args.pace_ms / 1000
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="overhead-", dir=CACHE))
    port = free_port()
    engine_root = f"http://127.0.0.1:{port}"
    engine_url = engine_root + "/v1"
    fake = spawn([sys.executable, "-m", "backend.devtools.fake_engine", "--port", str(port),
                  "--default-token-delay-s", str(pace_s)], log_name="overhead-fake-engine.log")  # fmt: skip
    services = EmbeddedServices(Settings(state_dir=tmp))
    load_start = os.getloadavg()[0]
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(stop, fake)
        await wait_http(engine_url + "/models", fake, what="fake engine")
        urls = await asyncio.to_thread(services.start)
        stack.callback(services.stop)
        # The settings chat_ui runs with, but for the engine URL, sentiment and warm-up off, and
        # twice the slots the largest level needs: overhead, not admission, is measured (a burst
        # near capacity waits a queue poll, 0.2 s, because entries that have a slot but have not
        # left the line yet count both as occupants and as ahead in line).
        slots = args.slots or 2 * max(levels)
        settings = Settings(
            state_dir=tmp, database={"url": urls.database_url}, redis={"url": urls.redis_url},
            llm=LLMSettings(base_url=engine_url),
            serving=ServingSettings(sentiment=False, warmup=False, slots_per_replica=slots),
        )  # fmt: skip
        # chat_ui's own construction: whatever it wires into the pipeline (guard, rate limits,
        # audit log, slots, queue, history, shaping) is measured here too.
        rt = await Runtime.start(settings)
        stack.push_async_callback(rt.aclose)
        gc.collect()  # as chat_ui's server does once its runtime has started
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        ours, ours_no_guard = rt.pipeline, without_guard(rt.pipeline)
        guard: LexiconStore | None = ours._guard
        if guard is None:
            raise RuntimeError("chat_ui's pipeline runs without the guard; nothing to measure")
        if guard.current().check(answer).hits:
            raise RuntimeError("the scripted answer trips the guard; pick another text")
        body: dict[str, Any] = {}  # filled below with the request the pipeline sends

        def client(base_url: str) -> AsyncOpenAI:
            http = DefaultAsyncHttpxClient(trust_env=False)  # the SDK's own connection limits
            return AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, http_client=http)

        direct = client(engine_url)
        stack.push_async_callback(direct.close)
        runs: dict[str, Callable[[list[str]], Awaitable[Stream]]] = {
            "direct": lambda _: openai_stream(direct, body),
            "ours": lambda threads: pipeline_stream(ours, threads),
            "ours_no_guard": lambda threads: pipeline_stream(ours_no_guard, threads),
        }
        litellm: dict[str, Any] = {}
        if args.no_litellm:
            litellm["error"] = "skipped (--no-litellm)"
        else:
            try:
                base, version = await stack.enter_async_context(litellm_proxy(engine_url))
                peer = client(base)
                stack.push_async_callback(peer.close)
                runs["litellm"] = lambda _: openai_stream(peer, body)
                litellm |= {"version": version, "base_url": base}
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                litellm["error"] = f"{type(exc).__name__}: {exc}"
                log.warning("LiteLLM left out: %s", litellm["error"])
        sides = [s for s in SIDES if s in runs]

        async def release(threads: list[str]) -> None:
            await asyncio.gather(*(ours.release(t) for t in threads))

        bench = Bench(engine_root, answer, pace_s, runs, release)
        await bench.batch("ours", 1, None)
        body |= await sent_request(engine_root)
        results: dict[str, Any] = {}
        for level, count in zip(levels, rounds, strict=True):
            samples = {side: Samples() for side in sides}
            for side in sides:  # one uncounted batch each: connections, tokenizer detection
                await bench.batch(side, level, None)
            started = time.monotonic()
            for r in range(count):
                for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                    await bench.batch(side, level, samples[side])
                log.info("%d streams, round %d/%d: %s", level, r + 1, count, "  ".join(
                    f"{s} {statistics.median(x.ttft_s for x in samples[s].streams) * 1000:.1f} ms"
                    for s in sides if samples[s].streams))  # fmt: skip
            figures = {side: summarize(samples[side]) for side in sides}
            for side in sides[1:]:
                figures[side] |= added(figures[side], figures["direct"])
            results[str(level)] = {"rounds": count, "wall_s": round(time.monotonic() - started, 1),
                                   "load_avg_1m": round(os.getloadavg()[0], 2), **figures}  # fmt: skip
        hold = guard.current().hold_chars
        audit_rows = await audit_count(rt)
    shutil.rmtree(tmp, ignore_errors=True)
    return headline(results, levels, litellm) | {
        "streams": levels, "rounds": rounds, "tokens": args.tokens, "pace_ms": args.pace_ms,
        "chunk": "one character per chunk; --tokens chunks per answer",
        "guard_hold_chars": hold, "guard_batch_chars": settings.guard.stream_batch_chars,
        "slots_per_replica": slots,
        "request": {"messages": len(body["messages"]), "max_tokens": body.get("max_tokens"),
                    "system_chars": len(body["messages"][0]["content"])}, "audit_records_written": audit_rows,
        "litellm": litellm, "by_streams": results,
        "gc_during_measured_batches": GC_PAUSES.summary(),
        "load_avg_1m_start": round(load_start, 2),
    }  # fmt: skip


def headline(results: dict[str, Any], levels: list[int], litellm: dict[str, Any]) -> dict[str, Any]:
    def pick(level: int, side: str, key: str) -> float | None:
        value: float | None = results[str(level)].get(side, {}).get(key)
        return value

    by_level = {str(n): ratio(pick(n, "ours", "added_ttft_ms_p50"),
                              pick(n, "litellm", "added_ttft_ms_p50")) for n in levels}  # fmt: skip
    no_guard = {str(n): ratio(pick(n, "ours_no_guard", "added_ttft_ms_p50"),
                              pick(n, "litellm", "added_ttft_ms_p50")) for n in levels}  # fmt: skip
    worst = max((r for r in by_level.values() if r is not None), default=None)
    worst_ng = max((r for r in no_guard.values() if r is not None), default=None)
    at_32 = pick(32, "ours", "added_ttft_ms_p99") if 32 in levels else None
    at_32_ng = pick(32, "ours_no_guard", "added_ttft_ms_p99") if 32 in levels else None
    return {
        "bench": "overhead",
        "added_p50_ratio_vs_litellm": worst,
        "added_p99_ms_at_32": at_32,
        "targets_met": {
            "added_p50_ratio_vs_litellm<=0.5": None if worst is None else worst <= 0.5,
            "added_p99_ms_at_32<=10": None if at_32 is None else at_32 <= 10,
        },
        "added_p50_ratio_vs_litellm_by_streams": by_level,
        "no_guard": {
            "added_p50_ratio_vs_litellm": worst_ng,
            "added_p99_ms_at_32": at_32_ng,
            "added_p50_ratio_vs_litellm_by_streams": no_guard,
        },
        "litellm_available": "error" not in litellm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--streams", default="1,32,128", help="concurrency levels")
    parser.add_argument("--rounds", default="20,24,5", help="rounds per level")
    parser.add_argument("--tokens", type=int, default=64, help="chunks per answer")
    parser.add_argument("--pace-ms", type=float, default=20.0, help="engine time between chunks")
    parser.add_argument(
        "--slots", type=int, default=0, help="slots per replica (0: twice the largest level)"
    )
    parser.add_argument("--no-litellm", action="store_true", help="leave the LiteLLM peer out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "pgserver", "backend.embedded", "backend.db"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("backend.serving.tokenizer").setLevel(logging.ERROR)  # "no tokenize endpoint"
    sys.path.insert(0, str(REPO))  # `backend` from this checkout, also when not pip-installed
    started = time.monotonic()
    result = asyncio.run(run(args))
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    result["cores"] = os.cpu_count()
    for level, figures in result["by_streams"].items():
        for side in SIDES:
            f = figures.get(side)
            if f and f.get("streams"):
                extra = (
                    f"  added p50 {f['added_ttft_ms_p50']:7.1f} p99 {f['added_ttft_ms_p99']:7.1f}"
                    if "added_ttft_ms_p50" in f
                    else ""
                )
                print(f"{level:>4} streams {side:14} TTFT p50 {f['ttft_ms_p50']:7.1f} p99 {f['ttft_ms_p99']:7.1f}"
                      f"  gap p99 {f['gap_ms_p99']}{extra}", file=sys.stderr)  # fmt: skip
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
