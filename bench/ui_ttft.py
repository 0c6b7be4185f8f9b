"""UI time-to-first-token benchmark: what a user sees through the chat UI against a direct engine call.

    .venv/bin/python bench/ui_ttft.py [--samples 20] [--warmup 2] [--max-tokens 32] [--pause-s 0.5]
                                      [--keep]

One run starts `qwen-stack up --model tiny` in a temporary state directory on free ports and times
spawn → "qwen-stack is up" (`up_ready_s`, which includes building the tiny model, ~1 s). Then,
alternating (and swapping which side goes first every pair, with --pause-s idle before each
sample), it takes --samples of each after --warmup uncounted pairs:

    ui      real Chromium (Playwright) logged in at /chat/; every sample opens a new chat, so the UI
            sends the system prompt plus one user message. Timed inside the page with
            performance.now(): click on #chat-submit → a MutationObserver sees non-blank text in the
            new assistant message (the DOM update, before paint).
    engine  the project's own OpenAIEngine streaming the same messages (system prompt + the same
            kind of user text), max_tokens and temperature straight to the engine; time to the
            first non-blank content delta.

Every sample has its own user text, so neither side gets a whole-prompt cache hit from the other.
Chromium shares the machine's cores with the engine, as a user's browser on this machine would.
The stack is stopped with SIGINT and must exit 0. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from playwright.async_api import Page, WebSocket, async_playwright

from backend.config import Settings
from backend.serving.engine import ChatRequest, Message, OpenAIEngine
from backend.serving.launcher import engine_base_url

REPO = Path(__file__).resolve().parent.parent
QWEN_STACK = REPO / ".venv" / "bin" / "qwen-stack"
UP_LINE = re.compile(r"qwen-stack is up in ([0-9.]+)s: (\S+)")
UP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
ANSWER_TIMEOUT_MS = 60_000
SESSION_TIMEOUT_S = 30.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ANSWER = '[data-step-type="assistant_message"] .message-content'

# Resolves with ms from the click on #chat-submit until the newest assistant message shows text.
MEASURE_JS = """
([sel, timeoutMs]) => new Promise((resolve, reject) => {
  const before = document.querySelectorAll(sel).length;
  const shown = () => {
    const nodes = document.querySelectorAll(sel);
    return nodes.length > before && nodes[nodes.length - 1].textContent.trim() !== "";
  };
  let t0 = 0;
  const observer = new MutationObserver(() => {
    if (shown()) { const t = performance.now(); observer.disconnect(); resolve(t - t0); }
  });
  observer.observe(document.body, {childList: true, subtree: true, characterData: true});
  setTimeout(() => { observer.disconnect(); reject(new Error("no answer text")); }, timeoutMs);
  t0 = performance.now();
  document.querySelector("#chat-submit").click();
})
"""
SUMMARY = """
qwen-stack up ready in {up_ready_s} s
TTFT median (p90) over {n} samples each, max_tokens={max_tokens}:
  through the UI  {ui_ttft_ms_median} ms ({ui_ttft_ms_p90} ms)
  engine direct   {engine_ttft_ms_median} ms ({engine_ttft_ms_p90} ms)
  UI overhead     {ui_overhead_ms_median} ms (ratio {ttft_ratio_ui_vs_engine}x)
stack stopped in {stop_s} s, exit code {stop_exit_code}; {ui_log_problem_lines} problem lines in ui.log"""


@dataclass(frozen=True)
class Running:
    """A started `qwen-stack up`: the process, its UI URL and how long it took to be ready."""

    process: asyncio.subprocess.Process
    ui_url: str
    ready_s: float  # spawn → "is up" line, measured here
    reported_s: float  # the X.Y the stack printed
    drain: asyncio.Task[None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_stack(env: dict[str, str], *, log_path: Path) -> Running:
    """Spawn `qwen-stack up --model tiny`; return once it prints its "is up" line."""
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(QWEN_STACK), "up", "--model", "tiny", env=env, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
        )  # fmt: skip
    assert process.stdout is not None
    stdout = process.stdout
    seen: list[str] = []

    async def ready_line() -> re.Match[str]:
        while line := (await stdout.readline()).decode(errors="replace"):
            seen.append(line.rstrip())
            if match := UP_LINE.search(line):
                return match
        raise RuntimeError("qwen-stack up exited before it was ready:\n" + "\n".join(seen))

    try:
        match = await asyncio.wait_for(ready_line(), UP_TIMEOUT_S)
    except BaseException:
        await stop_process(process)
        raise
    ready_s = time.perf_counter() - started

    async def drain() -> None:  # keep the pipe from filling while we measure
        while await stdout.readline():
            pass

    task = asyncio.create_task(drain())
    return Running(process, match.group(2), ready_s, float(match.group(1)), task)


async def stop_process(process: asyncio.subprocess.Process) -> int:
    """SIGINT (the stack then stops its children), wait; kill it if it hangs. The exit code."""
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
    try:
        return await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        return await process.wait()


async def stop_stack(running: Running) -> tuple[int, float]:
    """Stop the stack; returns (exit code, seconds it took to exit)."""
    started = time.perf_counter()
    code = await stop_process(running.process)
    await running.drain
    return code, time.perf_counter() - started


class ChatPage:
    """A logged-in chat page. Chainlit silently drops a message sent before its websocket session
    has run `on_chat_start`, and "new chat" opens a new websocket, so every sample first waits for
    the session to be ready: a task_start then task_end received on the newest socket."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self._ready = asyncio.Event()
        self._started = False
        page.on("websocket", self._on_socket)

    def _reset(self) -> None:
        self._ready.clear()
        self._started = False

    def _on_socket(self, socket: WebSocket) -> None:
        self._reset()
        socket.on("framereceived", self._on_frame)

    def _on_frame(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            return
        if payload.startswith('42["task_start"'):
            self._started = True
        elif payload.startswith('42["task_end"') and self._started:
            self._ready.set()

    async def login(self, ui_url: str, *, user: str, password: str) -> None:
        await self.page.goto(ui_url + "/chat/")
        await self.page.fill("#email", user)
        await self.page.fill("#password", password)
        await self.page.click("button[type=submit]")
        await asyncio.wait_for(self._ready.wait(), SESSION_TIMEOUT_S)

    async def new_chat(self) -> None:
        """Open a fresh thread (confirming the dialog), so the next message carries no history."""
        self._reset()
        await self.page.click("#new-chat-button")
        await self.page.click("#confirm")  # `confirm_new_chat = true` in .chainlit/config.toml
        await asyncio.wait_for(self._ready.wait(), SESSION_TIMEOUT_S)

    async def sample(self, text: str) -> float:
        """ms from submit to the first visible answer text; returns once the answer has finished."""
        if await self.page.locator(ANSWER).count():
            await self.new_chat()
        await self.page.fill("#chat-input", text)
        ttft_ms: float = await self.page.evaluate(MEASURE_JS, [ANSWER, ANSWER_TIMEOUT_MS])
        await self.page.wait_for_selector("#stop-button", state="detached")
        return ttft_ms


async def engine_sample(engine: OpenAIEngine, settings: Settings, text: str) -> float:
    """ms from the call to the first non-blank content delta; drains the whole answer."""
    request = ChatRequest(
        messages=(
            Message(role="system", content=settings.llm.system_prompt),
            Message(role="user", content=text),
        ),
        max_tokens=settings.llm.max_tokens,
        temperature=settings.llm.temperature,
    )
    started = time.perf_counter()
    ttft_ms: float | None = None
    async for delta in engine.stream(request):
        if ttft_ms is None and delta.strip():
            ttft_ms = (time.perf_counter() - started) * 1000
    if ttft_ms is None:
        raise RuntimeError("the engine answered without any text")
    return ttft_ms


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def log_problems(path: Path) -> list[str]:
    """The ERROR/WARNING/Traceback lines of a child's log (empty when there is no log)."""
    if not path.exists():
        return []
    marks = ("ERROR", "WARNING", "Traceback", "Error:")
    lines = path.read_text(errors="replace").splitlines()
    return [line for line in lines if any(mark in line for mark in marks)]


async def alternate(
    chat: ChatPage, engine: OpenAIEngine, settings: Settings, args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """(ui ms, engine ms) after the warmup pairs; each pair swaps which side goes first."""
    ui: list[float] = []
    direct: list[float] = []
    n = 0
    for pair in range(args.warmup + args.samples):
        for side in ("ui", "engine") if pair % 2 == 0 else ("engine", "ui"):
            n += 1
            await asyncio.sleep(args.pause_s)  # let the last answer's tail work finish
            text = f"第{n:03d}个问题：请用三句话介绍一下杭州西湖的春天。"
            if side == "ui":
                ms = await chat.sample(text)
            else:
                ms = await engine_sample(engine, settings, text)
            if pair >= args.warmup:
                (ui if side == "ui" else direct).append(ms)
            stage = "warmup" if pair < args.warmup else "sample"
            print(f"  {stage} {pair:2d} {side:6s} {ms:7.1f} ms", flush=True)
    return ui, direct


async def measure(args: argparse.Namespace, state_dir: Path) -> dict[str, object]:
    ui_port, engine_port = free_port(), free_port()
    settings = Settings(
        state_dir=state_dir,
        ui={"port": ui_port},
        engine={"port": engine_port},
        llm={"max_tokens": args.max_tokens, "base_url": None},
    )
    env = {
        **os.environ,
        "QWEN_STATE_DIR": str(state_dir),
        "QWEN_UI__PORT": str(ui_port),
        "QWEN_ENGINE__PORT": str(engine_port),
        "QWEN_LLM__MAX_TOKENS": str(args.max_tokens),
    }
    env.pop("QWEN_LLM__BASE_URL", None)  # the engine must be the one `up` starts
    print(f"starting qwen-stack up --model tiny in {state_dir} (ports {ui_port}, {engine_port})")
    load_start = os.getloadavg()[0]
    running = await start_stack(env, log_path=state_dir / "up.log")
    print(f"up in {running.ready_s:.2f}s (it reports {running.reported_s:.1f}s): {running.ui_url}")
    engine = OpenAIEngine.from_settings(settings.llm, base_url=engine_base_url(settings))
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            chat = ChatPage(await browser.new_page())
            password = settings.ui.admin_password.get_secret_value()
            await chat.login(running.ui_url, user=settings.ui.admin_user, password=password)
            ui, direct = await alternate(chat, engine, settings, args)
            await browser.close()
    finally:
        await engine.aclose()
        exit_code, stop_s = await stop_stack(running)
    ui_median, engine_median = statistics.median(ui), statistics.median(direct)
    problems = log_problems(settings.run_dir / "logs" / "ui.log")
    for line in sorted(set(problems))[:10]:
        print(f"  ui.log: {line}")
    return {
        "bench": "ui_ttft",
        "model": "tiny",
        "n": args.samples,
        "warmup": args.warmup,
        "max_tokens": args.max_tokens,
        "pause_s": args.pause_s,
        "cores": os.cpu_count(),
        "loadavg_1m_start": round(load_start, 2),  # other work on the machine skews every number
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "up_ready_s": round(running.ready_s, 3),
        "up_reported_s": running.reported_s,
        "ui_ttft_ms_median": round(ui_median, 1),
        "ui_ttft_ms_p90": round(p90(ui), 1),
        "engine_ttft_ms_median": round(engine_median, 1),
        "engine_ttft_ms_p90": round(p90(direct), 1),
        "ui_overhead_ms_median": round(ui_median - engine_median, 1),
        "ttft_ratio_ui_vs_engine": round(ui_median / engine_median, 2),
        "stop_s": round(stop_s, 2),
        "stop_exit_code": exit_code,
        "ui_log_problem_lines": len(problems),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20, help="samples per side")
    parser.add_argument("--warmup", type=int, default=2, help="pairs taken first and not counted")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--pause-s", type=float, default=0.5, help="idle time before each sample")
    parser.add_argument("--keep", action="store_true", help="keep the state dir (logs) afterwards")
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="qwen-ui-ttft-"))
    try:
        result = asyncio.run(measure(args, state_dir))
    finally:
        if not args.keep:
            shutil.rmtree(state_dir, ignore_errors=True)
    print(SUMMARY.format_map(result))
    print(json.dumps(result, ensure_ascii=False))
    return 0 if result["stop_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
