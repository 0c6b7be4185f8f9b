"""Concurrency benchmark: how many chat sessions stream smoothly through our UI against a bare endpoint.

    .venv/bin/python bench/concurrency.py [--tokens 90] [--rate 30] [--ramp-s 1] [--start 4]
                                          [--max-sessions 256] [--rounds 3] [--gap-limit-ms 50]
                                          [--budget-s 540]

One scripted fake engine (backend/devtools/fake_engine.py, its own process) streams every answer as
--tokens one-character chunks at --rate chunks a second. Session counts step up from --start,
doubling, for each side (see `next_count`), the sides alternating at every step and round:

    engine      clients straight to the engine (httpx, SSE): the floor this machine leaves
    bare        a bare FastAPI websocket endpoint (this file, --bare-server, under uvicorn) that
                streams the engine's deltas with the `openai` client, one frame per delta
    ui          chat_ui exactly as `qwen-stack up` runs it (uvicorn chat_ui.server:create_app) on
                embedded PostgreSQL + Redis, sentiment and warm-up off, slots, queue and the one
                login's rate limits too large to refuse; driven without a browser by
                python-socketio clients speaking Chainlit's protocol (REST login for the cookie,
                socket.io at /chat/ws/socket.io, `connection_successful`, `client_message`,
                `stream_start` and `stream_token` events)
    ui_batch1   the same UI with QWEN_GUARD__STREAM_BATCH_CHARS=1: the answer guard scans at
                every delta, not when 16 characters wait or 20 ms have passed since its last scan

Each round opens the sessions (16 at a time); once all are open they send, spread evenly over
--ramp-s (users arriving over a second, not in one instant), and every answer outlasts the ramp by
two seconds or more, so all sessions stream at once. A step holds when every session got the whole
answer and the p99 of the gaps between consecutive text arrivals, in the median of --rounds
rounds, is below --gap-limit-ms. This measures streaming capacity, not admission. The last stdout line is one JSON object;
bench/README.md has the details.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import WebSocket, WebSocketDisconnect  # the bare route's annotations resolve here
from overhead import spawn, stop, wait_http  # this folder is on sys.path when run as a script

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
SERVERS = ("engine", "bare", "ui", "ui_batch1")
MODEL = "qwen"
USER_TEXT = "请用几句话介绍一下杭州西湖的春天。"
ANSWER_SOURCE = (
    "西湖位于杭州城西，三面环山，一面临城。春天的西湖桃红柳绿，苏堤春晓是西湖十景之首，"
    "湖光山色相映成趣，游人泛舟湖上，可以看到远处的雷峰塔和保俶塔。"
)
CONNECT_PARALLEL = 16  # sessions opening at once (a browser crowd does not arrive in one ms)
ANSWER_TIMEOUT_S = 120.0
PAUSE_S = 0.3  # idle before every round, so the previous one's tail work is done
ROOMY = "100000"  # slots and queue depth: never the limit here
UNLIMITED = "1000000000"  # the one login's rate limits (all sessions share it)
log = logging.getLogger("bench.concurrency")


@dataclass
class Session:
    """What one client saw of one answer: arrival times of text and the text."""

    stamps: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    sent_at: float = 0.0


class Start:
    """A round's common start: every session opens first and `arrive`s (also when opening failed);
    once the last has, session i sends at t0 + i × ramp_s / sessions, t0 just after that: users
    arriving evenly over `ramp_s`, whatever opening took."""

    def __init__(self, sessions: int, ramp_s: float) -> None:
        self._left = sessions
        self._step = ramp_s / sessions
        self._all = asyncio.Event()
        self._t0 = 0.0

    def arrive(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._t0 = time.perf_counter() + 0.1
            self._all.set()

    async def wait(self, index: int) -> None:
        await self._all.wait()
        await asyncio.sleep(max(0.0, self._t0 + index * self._step - time.perf_counter()))


Client = Callable[[Start, int], Awaitable[Session]]
"""Opens session number i, sends one message at its start, returns what arrived."""


# ---------------------------------------------------------------- the bare endpoint (own process)


def bare_server(port: int, engine_url: str) -> None:
    """A websocket endpoint: each text frame received is a user message; every engine delta is
    sent back as {"token": ...}, then {"done": true}."""
    import uvicorn
    from fastapi import FastAPI
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient
    from openai.types.chat import ChatCompletionUserMessageParam

    app = FastAPI()
    client = AsyncOpenAI(base_url=engine_url, api_key="EMPTY", max_retries=0,
                         http_client=DefaultAsyncHttpxClient(trust_env=False))  # fmt: skip

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/ws")
    async def chat(socket: WebSocket) -> None:
        await socket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                text = await socket.receive_text()
                message: ChatCompletionUserMessageParam = {"role": "user", "content": text}
                chunks = await client.chat.completions.create(
                    model=MODEL, messages=[message], stream=True
                )
                async for chunk in chunks:
                    delta = chunk.choices[0].delta.content if chunk.choices else None
                    if delta:
                        await socket.send_text(json.dumps({"token": delta}, ensure_ascii=False))
                await socket.send_text('{"done": true}')

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------- processes


# spawn / stop / wait_http: shared with bench/overhead.py (imported at the top).


@contextlib.asynccontextmanager
async def chat_ui(
    engine_url: str, state: Path, *, batch1: bool
) -> AsyncIterator[tuple[str, str, str]]:
    """chat_ui on embedded PostgreSQL + Redis in `state`, as `qwen-stack up` starts it (migrated,
    admin login ensured, uvicorn chat_ui.server:create_app): (URL, user, password)."""
    from cpu_engine import free_port

    from backend.auth import Role, UserStore
    from backend.config import Settings
    from backend.db import migrate, open_pool
    from backend.embedded import EmbeddedServices

    settings = Settings(state_dir=state)
    services = EmbeddedServices(settings)
    urls = await asyncio.to_thread(services.start)
    try:
        await migrate(urls.database_url)
        pool = await open_pool(urls.database_url, min_size=1, max_size=2)
        try:
            user, password = settings.ui.admin_user, settings.ui.admin_password.get_secret_value()
            await UserStore(pool).ensure(user, password, role=Role.ADMIN)
        finally:
            await pool.close()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CI"}}
        env |= urls.env() | {
            "QWEN_STATE_DIR": str(state), "QWEN_UI__PORT": str(port), "QWEN_LLM__BASE_URL": engine_url,
            "QWEN_SERVING__SENTIMENT": "false", "QWEN_SERVING__WARMUP": "false",
            "QWEN_SERVING__SLOTS_PER_REPLICA": ROOMY, "QWEN_SERVING__QUEUE_MAX_DEPTH": ROOMY,
            # One login drives every session (the limits are per user): limits that never refuse.
            "QWEN_RATELIMIT__CONCURRENT_ANSWERS": UNLIMITED,
            "QWEN_RATELIMIT__MESSAGE_BURST": UNLIMITED,
            "QWEN_RATELIMIT__MESSAGES_PER_MINUTE": UNLIMITED,
            "QWEN_RATELIMIT__TOKEN_BURST": UNLIMITED,
            "QWEN_RATELIMIT__TOKENS_PER_MINUTE": UNLIMITED,
        }  # fmt: skip
        uvicorn = ["chat_ui.server:create_app", "--factory", "--host", "127.0.0.1", "--port",
                   str(port), "--timeout-graceful-shutdown", "15", "--log-level", "warning"]  # fmt: skip
        if batch1:  # the answer guard scans and releases at every delta
            env["QWEN_GUARD__STREAM_BATCH_CHARS"] = "1"
        name = "ui_batch1" if batch1 else "ui"
        process = spawn([sys.executable, "-m", "uvicorn", *uvicorn],
                        log_name=f"concurrency-{name}.log", env=env)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_http(url + "/healthz", process, what=name)
            yield url, user, password
        finally:
            stop(process)
    finally:
        await asyncio.to_thread(services.stop)


# ---------------------------------------------------------------- clients


async def login(url: str, user: str, password: str) -> str:
    """Chainlit's REST login; the access_token cookie it sets."""
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        response = await client.post(
            f"{url}/chat/login", data={"username": user, "password": password}
        )
        response.raise_for_status()
        token = response.cookies.get("access_token")
    if not token:
        raise RuntimeError("the login set no access_token cookie")
    return token


def ui_client(url: str, token: str, user: str, gate: asyncio.Semaphore) -> Client:
    """A Chainlit session as the web app opens it: socket.io over websocket with the auth cookie and
    the app's auth payload, `connection_successful`, then on_chat_start's task_start/task_end."""
    import socketio

    async def session(start: Start, index: int) -> Session:
        seen = Session()
        started, ready, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        sent = False
        sio = socketio.AsyncClient(reconnection=False)

        async def on_connect() -> None:
            await sio.emit("connection_successful")

        async def on_task_start(_: Any) -> None:
            started.set()

        async def on_task_end(_: Any) -> None:
            if sent:
                done.set()
            elif started.is_set():
                ready.set()

        async def on_stream_start(step: dict[str, Any]) -> None:
            if step.get("output") and step.get("type") == "assistant_message":
                seen.stamps.append(time.perf_counter())
                seen.text.append(step["output"])

        async def on_token(data: dict[str, Any]) -> None:
            if data.get("token") and not data.get("isInput"):
                seen.stamps.append(time.perf_counter())
                seen.text.append(data["token"])

        # Chainlit sends a stream's first text inside stream_start's step, the rest as stream_token.
        handlers = {"connect": on_connect, "task_start": on_task_start, "task_end": on_task_end,
                    "stream_start": on_stream_start, "stream_token": on_token}  # fmt: skip
        for event, handler in handlers.items():
            sio.on(event, handler)
        auth = {"clientType": "webapp", "sessionId": str(uuid.uuid4()), "threadId": "",
                "userEnv": "{}", "chatProfile": ""}  # fmt: skip
        try:
            try:
                async with gate:
                    await sio.connect(url, headers={"Cookie": f"access_token={token}", "Origin": url},
                                      auth=auth, transports=["websocket"],
                                      socketio_path="/chat/ws/socket.io", wait_timeout=30)  # fmt: skip
                    await asyncio.wait_for(ready.wait(), 60)
            finally:
                start.arrive()
            await start.wait(index)
            message = {"threadId": "", "id": str(uuid.uuid4()), "name": user, "type": "user_message",
                       "output": USER_TEXT,
                       "createdAt": datetime.datetime.now(datetime.UTC).isoformat()}  # fmt: skip
            sent = True
            seen.sent_at = time.perf_counter()
            await sio.emit("client_message", {"message": message, "fileReferences": []})
            await asyncio.wait_for(done.wait(), ANSWER_TIMEOUT_S)
        finally:
            with contextlib.suppress(Exception):
                await sio.emit("clear_session")  # as the web app's "new chat": no 1-hour leftovers
                await sio.disconnect()
        return seen

    return session


def engine_client(engine_url: str, http: httpx.AsyncClient) -> Client:
    """Straight to the engine over HTTP (SSE): the floor this machine's scheduling leaves."""

    async def session(start: Start, index: int) -> Session:
        seen = Session()
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": USER_TEXT}],
            "stream": True,
        }
        start.arrive()
        await start.wait(index)
        seen.sent_at = time.perf_counter()
        async with http.stream("POST", engine_url + "/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and (content := choices[0]["delta"].get("content")):
                        seen.stamps.append(time.perf_counter())
                        seen.text.append(content)
        return seen

    return session


def bare_client(url: str, gate: asyncio.Semaphore) -> Client:
    import aiohttp

    async def session(start: Start, index: int) -> Session:
        seen = Session()
        async with aiohttp.ClientSession() as http:
            try:
                async with gate:
                    socket = await http.ws_connect(url.replace("http", "ws", 1) + "/ws")
            finally:
                start.arrive()
            async with socket:
                await start.wait(index)
                seen.sent_at = time.perf_counter()
                await socket.send_str(USER_TEXT)
                async with asyncio.timeout(ANSWER_TIMEOUT_S):
                    async for frame in socket:
                        data = json.loads(frame.data)
                        if data.get("done"):
                            break
                        seen.stamps.append(time.perf_counter())
                        seen.text.append(data["token"])
        return seen

    return session


# ---------------------------------------------------------------- steps


@dataclass
class Step:
    sessions: int
    gaps_ms: list[float] = field(default_factory=list)  # pooled over the rounds
    round_p99_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    complete: int = 0
    attempted: int = 0
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def p99(self) -> float | None:
        """The gap p99 of the median round: one round that other work on the machine disturbed
        does not decide the step."""
        return statistics.median(self.round_p99_ms) if self.round_p99_ms else None

    def holds(self, limit_ms: float) -> bool:
        p99 = self.p99()
        return (
            not self.failed
            and self.complete == self.attempted
            and p99 is not None
            and p99 < limit_ms
        )

    def summary(self, limit_ms: float) -> dict[str, Any]:
        pooled = quantile(self.gaps_ms, 99)
        return {
            "sessions": self.sessions, "holds": self.holds(limit_ms),
            "gap_ms_p99": rounded(self.p99()), "gap_ms_p99_by_round": [rounded(x) for x in self.round_p99_ms],
            "gap_ms_p99_pooled": rounded(pooled), "gap_ms_p50": rounded(quantile(self.gaps_ms, 50)),
            "ttft_ms_p50": rounded(quantile(self.ttft_ms, 50)),
            "complete": self.complete, "attempted": self.attempted,
            "errors": sorted(set(self.failed))[:3], "wall_s": round(self.wall_s, 1),
        }  # fmt: skip


def quantile(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def measure(
    client: Client, step: Step, *, answer: str, rate: float, ramp_s: float, engine_root: str
) -> None:
    """One round: `step.sessions` sessions, their messages spread evenly over `ramp_s`."""
    async with httpx.AsyncClient(trust_env=False) as admin:
        (await admin.post(f"{engine_root}/_fake/reset")).raise_for_status()
        steps = [{"text": answer, "token_delay_s": 1 / rate}] * step.sessions
        (await admin.post(f"{engine_root}/_fake/script", json=steps)).raise_for_status()
    await asyncio.sleep(PAUSE_S)
    started = time.monotonic()
    start = Start(step.sessions, ramp_s)
    results = await asyncio.gather(*(client(start, i) for i in range(step.sessions)),
                                   return_exceptions=True)  # fmt: skip
    step.wall_s += time.monotonic() - started
    step.attempted += step.sessions
    gaps: list[float] = []
    for result in results:
        if isinstance(result, BaseException):
            step.failed.append(f"{type(result).__name__}: {result}"[:160])
            continue
        if "".join(result.text) != answer:
            step.failed.append(
                f"incomplete answer: {len(''.join(result.text))} of {len(answer)} chars"
            )
            continue
        step.complete += 1
        step.ttft_ms.append((result.stamps[0] - result.sent_at) * 1000)
        gaps += [(b - a) * 1000 for a, b in itertools.pairwise(result.stamps)]
    step.gaps_ms += gaps
    if (p99 := quantile(gaps, 99)) is not None:
        step.round_p99_ms.append(p99)


def log_count(path: Path, needle: str) -> int:
    return (
        sum(needle in line for line in path.read_text(errors="replace").splitlines())
        if path.exists()
        else 0
    )


def next_count(tried: dict[int, bool], *, start: int, cap: int) -> int | None:
    """The next session count to try, None when done. Doubling from `start` until two counts above
    the best that held have failed (one failure may be noise from other work on the machine), then
    halving the interval between the best hold and the first failure above it while it is wider
    than a quarter of the hold; halving down from `start` while nothing holds."""
    if not tried:
        return start
    held = max((n for n, ok in tried.items() if ok), default=0)
    if held == 0:
        low = min(tried)
        return low // 2 if low > 1 else None
    above = sorted(n for n, ok in tried.items() if not ok and n > held)
    if len(above) < 2 and max(tried) * 2 <= cap:
        return max(tried) * 2
    if not above:
        return None
    middle = (held + above[0]) // 2
    return middle if above[0] - held > max(2, held // 4) and middle not in tried else None


async def run(args: argparse.Namespace, started: float) -> dict[str, Any]:
    from cpu_engine import free_port

    CACHE.mkdir(parents=True, exist_ok=True)
    answer = (ANSWER_SOURCE * (args.tokens // len(ANSWER_SOURCE) + 1))[: args.tokens]
    state = Path(tempfile.mkdtemp(prefix="concurrency-", dir=CACHE))
    load_start = os.getloadavg()[0]
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, state, True)
        port = free_port()
        engine_root = f"http://127.0.0.1:{port}"
        fake = spawn([sys.executable, "-m", "backend.devtools.fake_engine", "--port", str(port)],
                     log_name="concurrency-fake-engine.log")  # fmt: skip
        stack.callback(stop, fake)
        await wait_http(engine_root + "/v1/models", fake, what="fake engine")
        bare_port = free_port()
        bare = spawn([sys.executable, __file__, "--bare-server", str(bare_port), engine_root + "/v1"],
                     log_name="concurrency-bare.log")  # fmt: skip
        stack.callback(stop, bare)
        bare_url = f"http://127.0.0.1:{bare_port}"
        await wait_http(bare_url + "/healthz", bare, what="bare endpoint")
        gate = asyncio.Semaphore(CONNECT_PARALLEL)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        http = await stack.enter_async_context(
            httpx.AsyncClient(trust_env=False, limits=limits, timeout=ANSWER_TIMEOUT_S)
        )
        clients: dict[str, Client] = {
            "engine": engine_client(engine_root + "/v1", http),
            "bare": bare_client(bare_url, gate),
        }
        for name in ("ui", "ui_batch1"):
            url, user, password = await stack.enter_async_context(
                chat_ui(engine_root + "/v1", state / name, batch1=name == "ui_batch1")
            )
            clients[name] = ui_client(url, await login(url, user, password), user, gate)
        log.info("servers up in %.1f s", time.monotonic() - started)
        for client in clients.values():  # warm-up: connections, imports, tokenizer probe
            await measure(client, Step(2), answer=answer, rate=args.rate, ramp_s=args.ramp_s,
                          engine_root=engine_root)  # fmt: skip
        steps: dict[str, list[Step]] = {name: [] for name in SERVERS}
        tried: dict[str, dict[int, bool]] = {name: {} for name in SERVERS}
        budget_hit = False
        last_s, last_sessions = 0.0, 1  # the previous step: wall time, sessions over all sides
        for index in itertools.count():
            pending = {
                n: next_count(tried[n], start=args.start, cap=args.max_sessions) for n in SERVERS
            }
            active = [n for n in SERVERS if pending[n] is not None]
            if not active:
                break
            # A step's time grows with its sessions (opening them, and the streams slowing down).
            sessions = sum(pending[n] or 0 for n in active)
            estimate_s = last_s * max(1.0, sessions / last_sessions)
            if time.monotonic() - started + estimate_s > args.budget_s:
                budget_hit = True
                log.warning("the next step (~%.0f s) would pass --budget-s; stopping with %s "
                            "still stepping", estimate_s, active)  # fmt: skip
                break
            step_started = time.monotonic()
            order = active if index % 2 == 0 else active[::-1]
            current = {n: Step(pending[n] or 0) for n in active}
            for r in range(args.rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    await measure(clients[name], current[name], answer=answer, rate=args.rate,
                                  ramp_s=args.ramp_s, engine_root=engine_root)  # fmt: skip
            last_s, last_sessions = time.monotonic() - step_started, sessions
            for name in active:
                step = current[name]
                steps[name].append(step)
                tried[name][step.sessions] = ok = step.holds(args.gap_limit_ms)
                log.info("%-9s %4d sessions: gap p99 %s ms (rounds %s), %d/%d complete -> %s",
                         name, step.sessions, rounded(step.p99()),
                         [rounded(x) for x in step.round_p99_ms], step.complete, step.attempted,
                         "holds" if ok else "fails")  # fmt: skip
    held = {n: max((k for k, ok in tried[n].items() if ok), default=0) for n in SERVERS}
    first_fail = {n: min((k for k, ok in tried[n].items() if not ok and k > held[n]), default=None)
                  for n in SERVERS}  # fmt: skip

    def versus_bare(name: str) -> float | None:
        return round(held[name] / held["bare"], 3) if held["bare"] else None

    refused = {
        name: log_count(CACHE / f"concurrency-{name}.log", "RateLimited")
        for name in ("ui", "ui_batch1")
    }
    if any(refused.values()):
        log.warning("the UI refused answers by a rate limit (a new limit to raise?): %s", refused)
    ratio = versus_bare("ui")
    return {
        "bench": "concurrency",
        "sessions_ratio_vs_bare": ratio,
        "target_met": None if ratio is None else ratio >= 0.5,
        "max_sessions": held,
        "first_failing_sessions_above_max": first_fail,
        "sessions_ratio_vs_bare_batch1": versus_bare("ui_batch1"),
        "bare_vs_engine_direct": round(held["bare"] / held["engine"], 3) if held["engine"] else None,
        "gap_limit_ms": args.gap_limit_ms, "rate_tokens_per_s": args.rate, "tokens": args.tokens,
        "rounds_per_step": args.rounds, "ramp_s": args.ramp_s, "start_sessions": args.start,
        "max_sessions_cap": args.max_sessions, "budget_s": args.budget_s, "budget_hit": budget_hit,
        "steps": {n: [s.summary(args.gap_limit_ms) for s in steps[n]] for n in SERVERS},
        "ui_rate_limited_answers": refused, "load_avg_1m_start": round(load_start, 2),
    }  # fmt: skip


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--bare-server":
        bare_server(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tokens", type=int, default=90, help="chunks per answer")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="sends spread over this")
    parser.add_argument("--rate", type=float, default=30.0, help="engine chunks per second")
    parser.add_argument("--max-sessions", type=int, default=256)
    parser.add_argument("--start", type=int, default=4, help="first session count")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per step")
    parser.add_argument("--gap-limit-ms", type=float, default=50.0)
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="no step that would end later"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "pgserver", "backend.embedded"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))  # `backend` from this checkout, also when not pip-installed
    started = time.monotonic()
    result = asyncio.run(run(args, started))
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    result["cores"] = os.cpu_count()
    for name in SERVERS:
        rows = ", ".join(f"{s['sessions']}:{s['gap_ms_p99']}" for s in result["steps"][name])
        print(f"{name:9} max sessions {result['max_sessions'][name]:4}  (sessions:gap p99 ms) {rows}",
              file=sys.stderr)  # fmt: skip
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
