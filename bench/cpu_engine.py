"""CPU engine benchmark: the llama.cpp server (Q4_K_M, f16) against transformers FP32 generation.

    .venv/bin/python bench/cpu_engine.py [--rounds 3] [--new-tokens 128] [--prompt-tokens 500]

Both sides run random weights of Qwen2.5-0.5B-Instruct's shape, generated here (a forward pass
costs the same whatever the weight values): GGUF files for llama.cpp, safetensors of the same values
for transformers. Our engine is started exactly as `qwen-stack` serves it
(backend/serving/launcher.py, default settings but the port). The peer runs in its own virtual
environment (bench/.venv-peer, created on first use from bench/peer_requirements.txt), so it never
shapes the project's dependencies. Every round sends each side the same fresh prompt of exactly
--prompt-tokens ChatML tokens and generates exactly --new-tokens tokens (end tokens banned, greedy);
the order of the sides rotates from round to round.

Measured: time to first token (server: first streamed content chunk over HTTP; transformers:
prefill plus first token), decode speed after the first token, and the peak resident memory
(VmHWM) of each serving process. Ratios are "ours / theirs in time": a decode ratio below 1/3 meets
the 3x goal. The last stdout line is one JSON object. Model files are cached in bench/.cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
PEER_VENV = BENCH_DIR / ".venv-peer"
PEER_REQUIREMENTS = BENCH_DIR / "peer_requirements.txt"
SEED = 0
SYSTEM_PROMPT = "你是通义千问（Qwen），一个乐于助人的中文助手。回答准确、简洁。"
ENGINES = ("llama_cpp_q4_k_m", "llama_cpp_f16")
PEER = "transformers_fp32"
Run = dict[str, float]
"""One measurement: ttft_s, decode_s (first to last generated token)."""


class Prompt(NamedTuple):
    system: str
    user: str
    ids: list[int]


log = logging.getLogger("bench.cpu_engine")


# ---------------------------------------------------------------- the peer (runs in .venv-peer)


def peer_main(model_dir: str, threads: int) -> None:
    """Serve generation requests as JSON lines on stdin/stdout with transformers FP32 on CPU."""
    import torch
    import transformers
    from transformers import Qwen2ForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"ready": True, **versions}), flush=True)

    class Clock(BaseStreamer):  # type: ignore[misc]
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    for line in sys.stdin:
        request = json.loads(line)
        ids = torch.tensor([request["ids"]])
        n, banned = request["new_tokens"], request["banned_ids"]
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, streamer=clock,
                max_new_tokens=n, min_new_tokens=n, eos_token_id=banned[0], pad_token_id=banned[0],
                suppress_tokens=banned,
            )  # fmt: skip
        # stamps[0] is the prompt itself, stamps[1] the first generated token.
        result = {
            "ttft_s": clock.stamps[1] - start,
            "decode_s": clock.stamps[-1] - clock.stamps[1],
            "new_tokens": int(out.shape[1] - ids.shape[1]),
        }
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- model files


def prepare_models(threads: int) -> dict[str, Path]:
    """The f16 and Q4_K_M GGUF files and the transformers directory, built once into CACHE."""
    from backend.devtools.gguf_export import Qwen2Shape, quantize_gguf, random_weights
    from backend.devtools.tiny_model import build_random_model

    shape = Qwen2Shape.QWEN2_5_0_5B
    f16 = build_random_model(CACHE, shape=shape, seed=SEED)
    q4 = f16.with_name(f16.name.replace("-f16-", "-q4_k_m-"))
    if not q4.exists():
        log.info("quantizing to Q4_K_M")
        quantize_gguf(f16, q4, n_threads=threads)
    hf_dir = CACHE / f16.stem.replace("-f16-", "-hf-")
    if not (hf_dir / "model.safetensors").exists():
        log.info("writing safetensors for transformers")
        hf_dir.mkdir(parents=True, exist_ok=True)
        (hf_dir / "config.json").write_text(json.dumps(hf_config(shape), indent=2))
        write_safetensors(hf_dir / "model.safetensors", random_weights(shape, seed=SEED))
    return {ENGINES[0]: q4, ENGINES[1]: f16, PEER: hf_dir}


def hf_config(shape: Any) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
        "max_position_embeddings": shape.max_position, "rope_theta": shape.rope_theta,
        "rms_norm_eps": shape.rms_eps, "hidden_act": "silu", "tie_word_embeddings": True,
        "use_sliding_window": False, "torch_dtype": "float32",
    }  # fmt: skip


def write_safetensors(path: Path, tensors: Mapping[str, Any]) -> None:
    """Write float32 numpy arrays in the safetensors format (8-byte header size, JSON, raw data)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}  # fmt: skip
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for array in tensors.values():
            array.astype("<f4").tofile(f)
    tmp.replace(path)


def ensure_peer_venv() -> Path:
    """bench/.venv-peer with torch 2.13.0 (the local CPU wheel) and transformers; its python."""
    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".installed"
    wanted = PEER_REQUIREMENTS.read_text()
    if marker.exists() and marker.read_text() == wanted:
        return python
    log.info("creating %s (first use)", PEER_VENV)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch first and pinned: a bare `torch` would pull several GB of CUDA packages.
    subprocess.run([*pip, "torch==2.13.0"], check=True, stdout=sys.stderr)
    subprocess.run([*pip, "-r", str(PEER_REQUIREMENTS)], check=True, stdout=sys.stderr)
    marker.write_text(wanted)
    return python


# ---------------------------------------------------------------- prompts


def chatml(system: str, user: str) -> str:
    """The prompt llama-cpp-python's `chatml` chat format renders for one system + user message."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def build_prompts(gguf: Path, *, count: int, tokens: int) -> tuple[list[Prompt], list[int]]:
    """`count` prompts of exactly `tokens` ChatML tokens sharing no real prefix, and the ids of the
    ChatML special tokens (<|im_end|> first), which generation must not produce."""
    import llama_cpp

    from backend.devtools import tiny_model

    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)

    def ids_of(system: str, user: str) -> list[int]:
        return vocab.tokenize(chatml(system, user).encode(), add_bos=False, special=True)

    prompts = []
    for index in range(count):
        system = f"{index}号会话。{SYSTEM_PROMPT}"
        text = "\n".join(tiny_model.generate_corpus(seed=1000 + index, lines=200))
        low, high = 0, len(text)  # binary search: the longest prefix of `text` that fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if len(ids_of(system, text[:mid])) <= tokens else (low, mid - 1)
        user = text[:low]
        while len(ids_of(system, user)) < tokens:
            user += "7"  # a digit is always one token in Qwen2's pre-tokenizer
        ids = ids_of(system, user)
        if len(ids) != tokens:
            raise RuntimeError(f"could not build a {tokens}-token prompt")
        prompts.append(Prompt(system=system, user=user, ids=ids))
    names = (tiny_model.IM_END, tiny_model.ENDOFTEXT, tiny_model.IM_START)
    banned = [vocab.tokenize(name.encode(), add_bos=False, special=True)[0] for name in names]
    vocab.close()
    return prompts, banned


# ---------------------------------------------------------------- the two sides


def start_engine(
    model: Path, *, threads: int, log_file: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Our engine as `qwen-stack` starts it (launcher defaults, a free port); waits until ready."""
    from backend.config import EngineSettings, LLMSettings, Settings
    from backend.serving.launcher import engine_base_url, engine_command, wait_ready

    engine = EngineSettings(n_threads=threads, port=free_port())
    settings = Settings(engine=engine, llm=LLMSettings())  # never a QWEN_LLM__BASE_URL elsewhere
    with log_file.open("wb") as out:
        process = subprocess.Popen(engine_command(settings, model), stdout=out, stderr=out)
    base = engine_base_url(settings)
    asyncio.run(wait_ready(base, timeout_s=300, process=process))
    return process, base


def chat_body(prompt: Prompt, n: int, banned: list[int], *, stream: bool) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": prompt.user},
        ],
        "max_tokens": n, "temperature": 0.0, "stream": stream,
        "logit_bias": {str(token): -100.0 for token in banned},
    }  # fmt: skip


def measure_engine(client: Any, base: str, prompt: Prompt, n: int, banned: list[int]) -> Run:
    """One streamed chat completion: TTFT at the first content chunk, decode until the last."""
    first = last = 0.0
    start = time.perf_counter()
    body = chat_body(prompt, n, banned, stream=True)
    with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                "content"
            ):
                last = time.perf_counter()
                first = first or last
    if not first:
        raise RuntimeError("the engine streamed no content")
    return {"ttft_s": first - start, "decode_s": last - first}


def check_engine(client: Any, base: str, prompt: Prompt, n: int, banned: list[int]) -> Run:
    """A non-streamed warm-up request; returns the engine's own token counts."""
    body = chat_body(prompt, n, banned, stream=False)
    usage = client.post(f"{base}/chat/completions", json=body).raise_for_status().json()["usage"]
    return {key: usage[key] for key in ("prompt_tokens", "completion_tokens")}


def measure_peer(peer: subprocess.Popen[str], prompt: Prompt, n: int, banned: list[int]) -> Run:
    assert peer.stdin is not None
    peer.stdin.write(json.dumps({"ids": prompt.ids, "new_tokens": n, "banned_ids": banned}) + "\n")
    peer.stdin.flush()
    result: Run = read_json_line(peer)
    if result.pop("new_tokens") != n:
        raise RuntimeError(f"transformers did not generate exactly {n} tokens")
    return result


def read_json_line(peer: subprocess.Popen[str]) -> dict[str, Any]:
    assert peer.stdout is not None
    for line in peer.stdout:
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise RuntimeError(f"transformers peer exited with {peer.wait()}")


def memory_mib(pid: int, field: str) -> float:
    """A memory line of /proc/PID/status (VmHWM: peak resident, VmRSS: resident now), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} for pid {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    CACHE.mkdir(parents=True, exist_ok=True)
    peer_python = ensure_peer_venv()
    models = prepare_models(args.threads)
    n, sides = args.new_tokens, list(models)
    prompts, banned = build_prompts(
        models[ENGINES[1]], count=args.rounds + 1, tokens=args.prompt_tokens
    )
    threads = ["--threads", str(args.threads)]
    command = [str(peer_python), __file__, "--peer", str(models[PEER]), *threads]
    peer = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    engines: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    runs: dict[str, list[Run]] = {side: [] for side in sides}
    memory: dict[str, dict[str, float]] = {}
    try:
        for side in ENGINES:
            engines[side] = start_engine(
                models[side], threads=args.threads, log_file=CACHE / f"{side}.log"
            )
        versions = read_json_line(peer)
        memory = {
            side: {"rss_loaded_mib": memory_mib(p.pid, "VmRSS")} for side, (p, _) in engines.items()
        }
        memory[PEER] = {"rss_loaded_mib": memory_mib(peer.pid, "VmRSS")}
        with httpx.Client(timeout=httpx.Timeout(900, connect=5), trust_env=False) as client:
            counts = {
                side: check_engine(client, base, prompts[0], n, banned)
                for side, (_, base) in engines.items()
            }
            measure_peer(peer, prompts[0], n, banned)
            log.info("warm-up done; token counts reported by llama.cpp: %s", counts)
            for index, prompt in enumerate(prompts[1:]):
                for side in sides[index % 3 :] + sides[: index % 3]:
                    if side == PEER:
                        result = measure_peer(peer, prompt, n, banned)
                    else:
                        result = measure_engine(client, engines[side][1], prompt, n, banned)
                    log.info("round %d %s: %s", index + 1, side, result)
                    runs[side].append(result)
        for side, pid in [(s, p.pid) for s, (p, _) in engines.items()] + [(PEER, peer.pid)]:
            memory[side]["peak_rss_mib"] = memory_mib(pid, "VmHWM")
    finally:
        for process, _ in engines.values():
            process.terminate()
            process.wait(timeout=30)
        peer.terminate()
        peer.wait(timeout=30)
    variants = {side: summarize(runs[side], n) | memory[side] for side in sides}
    for side in ENGINES:
        variants[side] |= ratios(variants[side], variants[PEER])
    headline = ratios(variants[ENGINES[0]], variants[PEER])
    return {
        "bench": "cpu_engine",
        "ours": "llama.cpp server (qwen-stack launcher), Q4_K_M: the default quantization",
        "theirs": "transformers FP32 generate on CPU",
        "model": "random weights, Qwen2.5-0.5B-Instruct shape (494M parameters, vocab 151936)",
        **headline,
        "decode_goal_3x_met": headline["decode_speedup_vs_transformers"] >= 3.0,
        "prompt_tokens": args.prompt_tokens, "new_tokens": n, "rounds": args.rounds,
        "threads": args.threads, "engine_token_counts": counts, "variants": variants,
        "machine": machine_info() | {k: v for k, v in versions.items() if k != "ready"},
    }  # fmt: skip


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """Ours / theirs in time (below 1 is faster), and the decode speed-up for readability."""
    decode = ours["decode_ms_per_token"] / theirs["decode_ms_per_token"]
    return {
        "decode_ratio_vs_transformers": round(decode, 3),
        "decode_speedup_vs_transformers": round(1 / decode, 2),
        "ttft_ratio_vs_transformers": round(ours["ttft_s"] / theirs["ttft_s"], 3),
    }


def summarize(runs: list[Run], n: int) -> dict[str, Any]:
    per_token = [run["decode_s"] / (n - 1) for run in runs]
    return {
        "ttft_s": round(statistics.median(run["ttft_s"] for run in runs), 3),
        "decode_ms_per_token": round(1000 * statistics.median(per_token), 2),
        "decode_tok_s": round(statistics.median(1 / t for t in per_token), 2),
        "runs": [{key: round(value, 3) for key, value in run.items()} for run in runs],
    }


def machine_info() -> dict[str, Any]:
    import llama_cpp

    cpuinfo = Path("/proc/cpuinfo").read_text()
    names = [
        ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")
    ]
    return {
        "cpu": names[0] if names else "?", "cores": os.cpu_count(), "avx512": "avx512f" in cpuinfo,
        "mem_gib": round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1),
        "load_avg_1m_at_end": os.getloadavg()[0], "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer_main(args.peer, args.threads)
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))  # `backend` from this checkout, also when not pip-installed
    started = time.monotonic()
    result = run(args)
    result["wall_s"] = round(time.monotonic() - started, 1)
    for side, values in result["variants"].items():
        print(
            f"{side:18} TTFT {values['ttft_s']:6.2f} s   decode {values['decode_tok_s']:6.2f} tok/s"
            f"   peak {values['peak_rss_mib']:7.1f} MiB"
        )
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
