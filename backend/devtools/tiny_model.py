"""Random-weight Qwen2 GGUF models with a locally trained tokenizer, for tests and benchmarks.

`build_tiny_model` writes a model small enough for every test run (hidden 64, 2 layers, vocab 4096);
`build_random_model` writes any `Qwen2Shape`, e.g. Qwen2.5-0.5B's for the CPU engine benchmark. The
tokenizer is byte-level BPE with Qwen2's pre-tokenizer, trained on generated Chinese/English text,
with Qwen's ChatML special tokens and chat template. Random weights generate junk text (often
partial UTF-8); only structure and speed are meaningful. Builds are deterministic and cached.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

from gguf import TokenType
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from backend.devtools.gguf_export import Qwen2Shape, Vocab, WeightType, random_weights, write_gguf

log = logging.getLogger(__name__)

BUILD_VERSION = 2
"""Bump when the builder's output changes, so cached files are rebuilt."""

TRAINED_VOCAB_SIZE = 4096
"""Trained tokens: 256 bytes, BPE merges and the 3 ChatML specials; larger shapes get fillers."""

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's split pattern; llama.cpp's `qwen2` pre-tokenizer applies the same one."""

QWEN_CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}"
    "{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.'
    '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}'
    '{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
    '\\n</tool_call><|im_end|>\\n" }}'
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    '{%- elif message.role == "tool" %}'
    '{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}'
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    '{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}'
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5-Instruct's ChatML template (with tool calls), as stored in its tokenizer_config.json."""


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write (or reuse) the tiny test model in `out_dir`; return its path. Takes a few seconds."""
    return build_random_model(out_dir, shape=Qwen2Shape.TINY, seed=seed)


def build_random_model(
    out_dir: Path,
    *,
    shape: Qwen2Shape,
    seed: int = 0,
    weight_type: WeightType = WeightType.F16,
) -> Path:
    """Write (or reuse) a random-weight Qwen2 GGUF of `shape` in `out_dir` and return its path.

    The file name carries a digest of every parameter, so an existing file is returned untouched;
    a new one is written to a temp name and renamed, so a crashed build never leaves a half file.
    The weights are `random_weights(shape, seed=seed)`. Qwen2.5-0.5B takes ~1 minute and ~3 GB RAM.
    """
    path = out_dir / model_file_name(shape, seed=seed, weight_type=weight_type)
    if path.exists():
        return path
    log.info("building random %s model in %s", shape.name, out_dir)
    vocab = build_vocab(shape.vocab_size, seed=seed)
    weights = random_weights(shape, seed=seed)
    return write_gguf(path, shape=shape, vocab=vocab, weights=weights, weight_type=weight_type)


def model_file_name(shape: Qwen2Shape, *, seed: int, weight_type: WeightType) -> str:
    """The cache file name for these parameters, e.g. `qwen2-tiny-s0-f16-1a2b3c4d5e6f.gguf`."""
    # The libraries that shape the bytes are part of the key: an upgrade builds a new file.
    libraries = [importlib.metadata.version(name) for name in ("gguf", "numpy", "tokenizers")]
    key = repr((BUILD_VERSION, TRAINED_VOCAB_SIZE, shape, seed, weight_type.value, libraries))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"qwen2-{shape.name}-s{seed}-{weight_type}-{digest}.gguf"


def train_tokenizer(*, seed: int = 0) -> Tokenizer:
    """Train the byte-level BPE tokenizer: TRAINED_VOCAB_SIZE tokens, the ChatML specials last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generate_corpus(seed=seed), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def build_vocab(size: int, *, seed: int = 0) -> Vocab:
    """The trained vocabulary, padded to `size` tokens: BPE tokens, ChatML specials, fillers.

    Fillers (`Ġpad<id>`, normal tokens no merge produces) stand in for the embedding rows a real
    tokenizer would fill. They are normal rather than control tokens so that a random model, which
    mostly samples them, streams visible text for every token like a real model does.
    Raises ValueError if `size` is smaller than the trained vocabulary.
    """
    tokenizer = train_tokenizer(seed=seed)
    by_id = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    tokens = [token for token, _ in by_id]
    if [token_id for _, token_id in by_id] != list(range(len(tokens))):
        raise ValueError("trained vocabulary ids are not contiguous")
    if size < len(tokens):
        raise ValueError(f"vocabulary size {size} is below the {len(tokens)} trained tokens")
    tokens += [f"Ġpad{i}" for i in range(len(tokens), size)]
    types = [TokenType.CONTROL if token in SPECIAL_TOKENS else TokenType.NORMAL for token in tokens]
    return Vocab(
        tokens=tuple(tokens),
        token_types=tuple(int(t) for t in types),
        merges=tuple(_merges(tokenizer)),
        bos_id=tokens.index(ENDOFTEXT),
        eos_id=tokens.index(IM_END),
        pad_id=tokens.index(ENDOFTEXT),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _merges(tokenizer: Tokenizer) -> list[str]:
    model = json.loads(tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


_ZH_WORDS = (
    "你好 谢谢 请问 我们 他们 今天 明天 昨天 时间 问题 回答 知识 文档 模型 服务 系统 用户 "
    "管理 数据 北京 上海 中国 世界 学习 工作 生活 朋友 家人 公司 学校 老师 学生 医生 天气 "
    "下雨 晴天 春天 夏天 秋天 冬天 吃饭 喝茶 咖啡 米饭 面条 水果 苹果 手机 电脑 网络 软件 "
    "硬件 程序 代码 测试 部署 服务器 数据库 搜索 检索 向量 文本 中文 英文 翻译 总结 分析 "
    "报告 会议 项目 计划 目标 结果 成功 失败 错误 安全 隐私 政策 法律 经济 市场 价格 增长 "
    "下降 提高 降低 重要 简单 复杂 快速 缓慢 准确 可能 应该 必须 已经 正在 如果 因为 所以 "
    "但是 而且 或者 虽然 然后 非常 特别 一些 所有 每个 这个 那个 什么 怎么 为什么 哪里 "
    "多少 可以 需要 希望 认为 知道 觉得 发现 开始 结束 继续 支持 帮助 提供 使用 通义千问 "
    "人工智能 机器学习 自然语言 处理 大模型 推理 训练 参数 上下文 长度 速度 内存 显卡 "
    "的 了 是 在 有 和 就 不 也 都 很 到 说 要 去 会 着 没有 看 好 自己 这 那 你 我 他 "
    "她 它 一 二 三"
)
_EN_WORDS = (
    "the of and to in is that for it as with was on be at by this have from or an are not but "
    "what all were when we there can which their if will each about how up out them then she many "
    "some so these would other into has more her two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know model server token prompt answer question document "
    "search vector database cache latency stream request response engine queue session chat user "
    "Qwen Python Redis PostgreSQL GPU CPU memory thread context window summary translate hello"
)
_PUNCT_ZH = "，。！？、；：“”（）《》"
_PUNCT_EN = ",.!?;:\"'()-"


def generate_corpus(*, seed: int = 0, lines: int = 12000) -> Iterator[str]:
    """Deterministic mixed Chinese/English text with numbers, dates and punctuation, by line."""
    rng = random.Random(seed)  # noqa: S311 (test data, not secrets)
    zh, en = _ZH_WORDS.split(), _EN_WORDS.split()
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.5:
            words = [rng.choice(zh) for _ in range(rng.randint(4, 30))]
            yield _punctuate(rng, words, "", _PUNCT_ZH, "。")
        elif kind < 0.8:
            words = [rng.choice(en) for _ in range(rng.randint(4, 25))]
            yield _punctuate(rng, words, " ", _PUNCT_EN, ".").capitalize()
        else:
            yield (
                f"{rng.choice(('system', 'user', 'assistant'))}\n{rng.choice(zh)}{rng.choice(zh)} "
                f"{rng.choice(en)} "
                f"{rng.randint(1990, 2030)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日，"
                f"{rng.randint(0, 10 ** rng.randint(1, 7))} {rng.choice(en)} "
                f"{rng.uniform(0, 100):.{rng.randint(0, 3)}f}% {rng.choice(zh)}？"
            )


def _punctuate(rng: random.Random, words: list[str], sep: str, marks: str, end: str) -> str:
    out = []
    for word in words:
        out.append(word)
        if rng.random() < 0.12:
            out.append(rng.choice(marks))
        if rng.random() < 0.05:
            out.append(str(rng.randint(0, 9999)))
    return sep.join(out) + end
