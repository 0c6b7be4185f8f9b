"""Sticky-session benchmark: time to first token with session slots vs round-robin routing.

    .venv/bin/python bench/sticky.py [--conversations 20] [--turns 6] [--budget-s 900] [--cache-gib 0]

Two llama.cpp replicas as `qwen-stack` starts them (one thread and a RAM prompt cache each: by
default sized to the sessions slots pin to one replica, --cache-gib to set it), random weights of
Qwen2.5-0.5B's shape (Q4_K_M). Turns are shaped like LMSYS-Chat-1M's averages: a unique user
message of ~70 tokens and the model's real 210-token reply, so prompts reach ~1.5k tokens by turn
6. Turns come in waves (turn t of all conversations in a seeded shuffled arrival order, then t+1);
each arrival is routed by `slots` (our SlotTable on an embedded Redis) or `round_robin`, and one
worker per replica sends its requests one at a time.
Segments slots, rr, rr, slots (ABBA) each take half of the conversations on a FRESH replica pair.
Fewer conversations run (and the output says so) if a calibration says the run would pass
--budget-s. bench/README.md has the details. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
SEED = 0
MODES = ("slots", "round_robin")
SEGMENTS = (("slots", 0), ("round_robin", 0), ("round_robin", 1), ("slots", 1))
"""(mode, half of the conversations); each segment on a fresh pair of replicas."""
Message = dict[str, str]
Router = Callable[[int], Awaitable[int]]  # conversation index -> replica index

log = logging.getLogger("bench.sticky")


@dataclass(frozen=True)
class Turn:
    conversation: int
    index: int  # 0-based turn of the conversation
    replica: int
    ttft_s: float  # routing + send until the first non-empty content delta
    route_s: float  # routing alone
    prompt_tokens: int


@dataclass(frozen=True)
class Script:
    system: str
    users: list[list[str]]  # [conversation][turn]
    bias: dict[str, float]  # logit_bias: real text only, no ChatML end tokens (build_script)


@dataclass(frozen=True)
class Replica:
    process: subprocess.Popen[bytes]
    base: str  # OpenAI base URL, ending in /v1


def prepare_model() -> Path:
    """The Q4_K_M GGUF of random Qwen2.5-0.5B-shape weights, built once into CACHE."""
    from backend.devtools.gguf_export import Qwen2Shape, quantize_gguf
    from backend.devtools.tiny_model import build_random_model

    f16 = build_random_model(CACHE, shape=Qwen2Shape.QWEN2_5_0_5B, seed=SEED)
    q4 = f16.with_name(f16.name.replace("-f16-", "-q4_k_m-"))
    if not q4.exists():
        quantize_gguf(f16, q4, n_threads=os.cpu_count() or 1)
    return q4


def build_script(gguf: Path, *, system: str, conversations: int, turns: int, tokens: int) -> Script:
    """User messages of at most `tokens` tokens, each from its own seed (no shared prefixes)."""
    import llama_cpp

    from backend.devtools import tiny_model

    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)

    def text(seed: int, n: int) -> str:
        corpus = "\n".join(tiny_model.generate_corpus(seed=seed, lines=n // 8 + 20))
        low, high = 0, len(corpus)  # binary search: the longest prefix with at most n tokens
        while low < high:
            mid = (low + high + 1) // 2
            fits = len(vocab.tokenize(corpus[:mid].encode(), add_bos=False)) <= n
            low, high = (mid, high) if fits else (low, mid - 1)
        return corpus[:low]

    users = [
        [text(10_000 + 100 * c + t, tokens) for t in range(turns)] for c in range(conversations)
    ]
    # A real model's replies re-tokenize to the tokens it generated (it was trained on canonical
    # tokenizations), so the next turn's prompt extends the cached state token for token. Random
    # weights sample anything: the filler rows that pad the 4k trained tokens to Qwen's vocabulary
    # (`Ġpad<id>`, ~6 tokens each once the text is tokenized again) or pieces that merge with
    # their neighbours (a 200-token reply diverged after ~20 tokens, measured). So replies are
    # drawn from the words that are a whole pre-tokenizer chunk each (" word", " 词语": a space and
    # letters, tokenized back to themselves): any sequence of them re-tokenizes 1:1 (checked on
    # 200 random 200-token sequences). The end tokens are banned, so every reply has max_tokens.
    bias = {str(i): 30.0 for i in canonical_words(vocab)}
    for name in (tiny_model.IM_END, tiny_model.ENDOFTEXT, tiny_model.IM_START):
        bias[str(vocab.tokenize(name.encode(), add_bos=False, special=True)[0])] = -100.0
    vocab.close()
    return Script(system, users, bias)


WORD = re.compile(r"^ (?:[A-Za-z]+|[\u4e00-\u9fff]+)$")


def canonical_words(vocab: Any) -> list[int]:
    """Token ids whose text is a space and letters and tokenizes back to that one id."""
    words = []
    for token in range(vocab.n_vocab()):
        try:
            text = vocab.detokenize([token]).decode()
        except UnicodeDecodeError:  # a partial UTF-8 piece
            continue
        if WORD.match(text) and vocab.tokenize(text.encode(), add_bos=False) == [token]:
            words.append(token)
    return words


def chatml(messages: list[Message]) -> str:
    """The prompt llama-cpp-python's `chatml` format renders (checked against usage at warm-up)."""
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


@contextlib.asynccontextmanager
async def fresh_pair(model: Path, *, cache_bytes: int) -> AsyncIterator[list[Replica]]:
    """Two new replicas (empty prompt caches) exactly as the launcher starts them, but one thread
    and a free port each; ready on entry, stopped on exit."""
    from cpu_engine import free_port

    from backend.config import EngineSettings, LLMSettings, Settings
    from backend.serving.launcher import engine_base_url, engine_command, wait_ready

    replicas = []
    try:
        for index in range(2):
            engine = EngineSettings(n_threads=1, port=free_port(), cache_bytes=cache_bytes)
            settings = Settings(engine=engine, llm=LLMSettings())  # no QWEN_LLM__BASE_URL here
            with (CACHE / f"sticky-replica{index}.log").open("wb") as out:
                command = engine_command(settings, model)
                process = subprocess.Popen(command, stdout=out, stderr=out)  # noqa: ASYNC220
            replicas.append(Replica(process, engine_base_url(settings)))
        for replica in replicas:
            await wait_ready(replica.base, timeout_s=300, process=replica.process)
        yield replicas
    finally:
        for replica in replicas:
            replica.process.terminate()
        for replica in replicas:
            replica.process.wait(timeout=30)


async def stream_chat(
    client: httpx.AsyncClient, base: str, messages: list[Message], script: Script, n: int
) -> tuple[float, float, str]:
    """One streamed chat completion: (TTFT, whole request, reply text), seconds."""
    body = {"messages": messages, "max_tokens": n, "temperature": 0.0, "stream": True,
            "logit_bias": script.bias}  # fmt: skip
    reply, first, start = "", 0.0, time.perf_counter()
    async with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                content = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if content:
                    first = first or time.perf_counter()
                    reply += content
    if not first:
        raise RuntimeError(f"{base} streamed no content")
    return first - start, time.perf_counter() - start, reply


async def prompt_tokens(client: httpx.AsyncClient, base: str, messages: list[Message]) -> int:
    """The server's own token count of the prompt it renders for `messages`."""
    url = base.removesuffix("/v1") + "/extras/tokenize/count"
    response = await client.post(url, json={"input": chatml(messages)})
    count: int = response.raise_for_status().json()["count"]
    return count


async def probe(client: httpx.AsyncClient, base: str, script: Script) -> None:
    """The system prompt with max_tokens 1, like the stack's warm-up of a new lease; its usage
    proves that `prompt_tokens` counts what the server renders."""
    messages = [{"role": "system", "content": script.system}, {"role": "user", "content": "你好"}]
    body = {"messages": messages, "max_tokens": 1, "temperature": 0.0}
    usage = (await client.post(f"{base}/chat/completions", json=body)).json()["usage"]
    if usage["prompt_tokens"] != await prompt_tokens(client, base, messages):
        raise RuntimeError("the ChatML rendering here does not match the server's")


async def calibrate(
    client: httpx.AsyncClient, base: str, script: Script, n: int
) -> tuple[float, float, float]:
    """(TTFT of a cold turn the size of an average round-robin miss, TTFT of that conversation's
    next turn (a cache hit, like a pinned turn), decode time of an n-token reply), seconds. The
    cold prompt is the user messages of conversations 0 and 1 in one; this pair serves nothing
    else."""
    user = "\n".join(script.users[0] + script.users[1])
    messages = [{"role": "system", "content": script.system}, {"role": "user", "content": user}]
    cold_s, _, reply = await stream_chat(client, base, messages, script, 1)
    await probe(client, base, script)
    messages += [{"role": "assistant", "content": reply},
                 {"role": "user", "content": script.users[0][-1]}]  # fmt: skip
    warm_s, whole_s, _ = await stream_chat(client, base, messages, script, n)
    return cold_s, warm_s, whole_s - warm_s


def router_for(mode: str, redis: aioredis.Redis, urls: list[str], *, capacity: int) -> Router:
    """slots: our SlotTable on the embedded Redis (fresh keys each time); round_robin: a counter."""
    if mode == "round_robin":
        counter = itertools.count()

        async def next_replica(conversation: int) -> int:
            return next(counter) % len(urls)

        return next_replica

    from backend.serving.slots import SlotTable

    # Leases outlive the run; capacity holds every conversation (the wait queue is not measured).
    table = SlotTable(redis, capacity=capacity, ttl_s=3600, prefix=f"bench:{time.time_ns()}:")

    async def leased_replica(conversation: int) -> int:
        lease = await table.acquire(f"conversation-{conversation}", replicas=urls)
        if lease is None:
            raise RuntimeError("no free slot")
        return urls.index(lease.replica)

    return leased_replica


async def drive(
    client: httpx.AsyncClient, replicas: list[Replica], route: Router, script: Script,
    *, conversations: list[int], n: int,
) -> list[Turn]:  # fmt: skip
    """Every turn of `conversations`, wave by wave; one worker per replica."""
    history = {c: [{"role": "system", "content": script.system}] for c in conversations}
    rng = random.Random(SEED)  # the same arrival orders in both modes
    turns: list[Turn] = []

    last = len(script.users[0]) - 1

    async def worker(replica: int, t: int, queue: list[tuple[int, float]]) -> None:
        base = replicas[replica].base
        for c, route_s in queue:
            messages = [*history[c], {"role": "user", "content": script.users[c][t]}]
            # The last reply is never read back: one token is enough (TTFT does not depend on
            # max_tokens), which saves a sixth of the run's decoding.
            ttft_s, _, reply = await stream_chat(
                client, base, messages, script, n if t < last else 1
            )
            tokens = await prompt_tokens(client, base, messages)
            history[c] = [*messages, {"role": "assistant", "content": reply}]
            turns.append(Turn(c, t, replica, route_s + ttft_s, route_s, tokens))

    for t in range(len(script.users[0])):
        order = list(conversations)
        rng.shuffle(order)
        queues: list[list[tuple[int, float]]] = [[] for _ in replicas]
        for c in order:  # routed on arrival, in arrival order
            started = time.perf_counter()
            replica = await route(c)
            queues[replica].append((c, time.perf_counter() - started))
        await asyncio.gather(*(worker(r, t, queue) for r, queue in enumerate(queues)))
        log.info("turn %d: mean TTFT %.2f s", t + 1,
                 statistics.mean(x.ttft_s for x in turns if x.index == t))  # fmt: skip
    return turns


async def run(args: argparse.Namespace, started: float) -> dict[str, Any]:
    from cpu_engine import machine_info, memory_mib

    from backend.config import LLMSettings
    from backend.embedded import EmbeddedRedis

    CACHE.mkdir(parents=True, exist_ok=True)
    model = prepare_model()
    script = build_script(model, system=LLMSettings().system_prompt, tokens=args.user_tokens,
                          conversations=args.conversations, turns=args.turns)  # fmt: skip
    cache_bytes, n = (
        int(args.cache_gib * 2**30) or 2**30,
        args.max_tokens,
    )  # auto: 1 GiB to calibrate
    turns: dict[str, list[Turn]] = {mode: [] for mode in MODES}
    segments: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=5), trust_env=False) as client:
        pair_started = time.monotonic()
        async with fresh_pair(model, cache_bytes=cache_bytes) as replicas:
            pair_s = time.monotonic() - pair_started
            timings = await asyncio.gather(
                *(calibrate(client, r.base, script, n) for r in replicas)
            )
        count, estimate_s = fit_budget(args, timings, started, pair_s)
        if args.cache_gib <= 0:  # auto: each replica's cache holds its own pinned sessions
            cache_bytes = pinned_cache_bytes(args, count)
            log.info("cache per replica: %.0f MiB (auto)", cache_bytes / 2**20)
        with tempfile.TemporaryDirectory(prefix="sticky-") as tmp:
            embedded = EmbeddedRedis(Path(tmp) / "redis")
            redis = aioredis.from_url(embedded.start())
            try:
                for mode, half in SEGMENTS:
                    conversations = list(range(count))[half::2]
                    load_start, seg_started = os.getloadavg()[0], time.monotonic()
                    async with fresh_pair(model, cache_bytes=cache_bytes) as replicas:
                        await asyncio.gather(*(probe(client, r.base, script) for r in replicas))
                        urls = [r.base for r in replicas]
                        capacity = math.ceil(len(conversations) / len(urls))
                        route = router_for(mode, redis, urls, capacity=capacity)
                        log.info("%s: conversations %s", mode, conversations)
                        turns[mode] += await drive(client, replicas, route, script,
                                                   conversations=conversations, n=n)  # fmt: skip
                        peaks = [memory_mib(r.process.pid, "VmHWM") for r in replicas]
                    segments.append({"mode": mode, "conversations": conversations,
                                     "wall_s": round(time.monotonic() - seg_started, 1),
                                     "load_avg_1m": [load_start, os.getloadavg()[0]],
                                     "peak_rss_mib": peaks})  # fmt: skip
            finally:
                await redis.aclose()
                embedded.stop()
    modes = {mode: summarize(turns[mode]) for mode in MODES}
    later = {m: statistics.mean(t.ttft_s for t in turns[m] if t.index > 0) for m in MODES}
    slots, rr = modes["slots"], modes["round_robin"]
    return {
        "bench": "sticky",
        "ttft_ratio_slots_vs_rr": round(slots["ttft_mean_s"] / rr["ttft_mean_s"], 3),
        "ttft_p95_ratio_slots_vs_rr": round(slots["ttft_p95_s"] / rr["ttft_p95_s"], 3),
        "ttft_ratio_slots_vs_rr_turns_2plus": round(later["slots"] / later["round_robin"], 3),
        "target_ratio": round(1 / 3, 3),
        "conversations": count, "conversations_requested": args.conversations,
        "scaled_down": count < args.conversations, "estimated_s": round(estimate_s),
        "budget_s": args.budget_s, "turns": args.turns, "user_tokens": args.user_tokens,
        "max_tokens": n, "replicas": 2, "threads_per_replica": 1,
        "cache_gib_per_replica": round(cache_bytes / 2**30, 3),
        "cache_auto": args.cache_gib <= 0,
        "model": "random weights, Qwen2.5-0.5B-Instruct shape, Q4_K_M",
        "calibration_s": [{"cold_ttft": round(c, 2), "warm_ttft": round(w, 2), "decode": round(d, 2)}
                          for c, w, d in timings],
        "modes": modes, "segments": segments, "machine": machine_info(),
    }  # fmt: skip


KV_BYTES_PER_TOKEN = 24 * 2 * (2 * 64) * 2
"""Qwen2.5-0.5B's shape: 24 layers × K and V × 2 KV heads of 64 × f16. A lean cached state of a
586-token prompt measured 6.9 MiB, i.e. this plus a little."""


def pinned_cache_bytes(args: argparse.Namespace, count: int) -> int:
    """A prompt cache for the sessions slots pin to one replica in a segment (half of `count`
    conversations over 2 replicas), each at its largest state (the last turn's prompt and its
    one-token reply; measured 1,564 tokens with the defaults, this says 1,602), plus 10%.
    Superseded states are dropped as new ones are saved (BoundedRAMCache), so a pinned
    conversation holds one entry. Production caches hold what a replica's own traffic needs;
    round-robin gets the same memory and sends each replica every conversation."""
    per_segment = math.ceil(count / 2)
    pinned = math.ceil(per_segment / 2)
    turn_tokens = args.user_tokens + 12  # the message and its ChatML framing
    largest = 60 + (args.turns - 1) * (turn_tokens + args.max_tokens) + turn_tokens
    return int(pinned * largest * KV_BYTES_PER_TOKEN * 1.1)


def fit_budget(
    args: argparse.Namespace, timings: list[tuple[float, float, float]], started: float,
    pair_s: float,
) -> tuple[int, float]:  # fmt: skip
    """The most conversations (up to --conversations) whose estimated run fits --budget-s. Per
    replica: every reply but the last one's decoding, plus TTFT: slots ~ the warm calibration turn,
    round-robin ~ half warm (back on the previous replica), half cold."""
    cold_s = statistics.mean(cold for cold, _, _ in timings)
    warm_s = statistics.mean(warm for _, warm, _ in timings)
    decode_s = statistics.mean(decode for _, _, decode in timings)
    elapsed_s = time.monotonic() - started

    def estimate(count: int) -> float:
        turns = count * int(args.turns) / 2  # turns per replica and mode
        replies = count * (int(args.turns) - 1) / 2  # replies decoded in full
        ttft_s = turns * (warm_s + (warm_s + cold_s) / 2)  # both modes
        return elapsed_s + 4 * (pair_s + 5) + 2 * replies * decode_s + ttft_s

    fits = [c for c in range(4, args.conversations + 1) if estimate(c) <= args.budget_s]
    count = max(fits, default=4)
    if count < args.conversations:
        print(f"SCALED DOWN: {args.conversations} conversations would take ~"
              f"{estimate(args.conversations) / 60:.0f} min here (budget {args.budget_s / 60:.0f}"
              f" min); running {count}", flush=True)  # fmt: skip
    return count, estimate(count)


def summarize(turns: list[Turn]) -> dict[str, Any]:
    """TTFT mean/median/p95 over all turns, by turn index, and how often routing stayed put."""
    ttft, by_turn = [t.ttft_s for t in turns], []
    for index in sorted({t.index for t in turns}):
        these = [t.ttft_s for t in turns if t.index == index]
        tokens = [t.prompt_tokens for t in turns if t.index == index]
        by_turn.append({"turn": index + 1, "ttft_mean_s": round(statistics.mean(these), 2),
                        "ttft_median_s": round(statistics.median(these), 2),
                        "prompt_tokens_min_mean_max": [min(tokens), round(statistics.mean(tokens)), max(tokens)]})  # fmt: skip
    path = {(t.conversation, t.index): t.replica for t in turns}
    stays = [path[(c, i - 1)] == r for (c, i), r in path.items() if i > 0]
    return {
        "ttft_mean_s": round(statistics.mean(ttft), 3),
        "ttft_median_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(statistics.quantiles(ttft, n=20, method="inclusive")[18], 3),
        "route_ms_mean": round(1000 * statistics.mean(t.route_s for t in turns), 3),
        "turns_measured": len(turns),
        "same_replica_as_previous_turn": round(sum(stays) / len(stays), 3),
        "by_turn": by_turn,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--user-tokens", type=int, default=70, help="per user message (at most)")
    parser.add_argument("--max-tokens", type=int, default=210, help="per reply (exactly)")
    parser.add_argument(
        "--cache-gib", type=float, default=0.0,
        help="RAM prompt cache per replica; 0 (default): sized to one replica's pinned sessions",
    )  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=900.0, help="scale down past this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))  # `backend` from this checkout, also when not pip-installed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the replicas on the way out
    started = time.monotonic()
    result = asyncio.run(run(args, started))
    result["wall_s"] = round(time.monotonic() - started, 1)
    for mode in MODES:
        m = result["modes"][mode]
        tokens = "/".join(str(t["prompt_tokens_min_mean_max"][1]) for t in m["by_turn"])
        print(f"{mode:12} TTFT mean {m['ttft_mean_s']:6.2f} s  median {m['ttft_median_s']:6.2f} s"
              f"  p95 {m['ttft_p95_s']:6.2f} s  prompt tokens by turn {tokens}")  # fmt: skip
    scaled = f", SCALED DOWN from {args.conversations}" if result["scaled_down"] else ""
    print(f"slots / round-robin TTFT: mean {result['ttft_ratio_slots_vs_rr']}, p95 "
          f"{result['ttft_p95_ratio_slots_vs_rr']} (target <= 0.333); {result['conversations']} "
          f"conversations{scaled} x {args.turns} turns in {result['wall_s'] / 60:.1f} min")  # fmt: skip
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
