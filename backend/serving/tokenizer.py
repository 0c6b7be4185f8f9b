"""Counting tokens the way the engine does: its own tokenizer, over HTTP.

`Tokenizer.count(text)` is the one-method interface shaping needs. `EngineTokenizer` asks the engine,
trying each known endpoint once and remembering the one that answered:

    dialect            endpoint (server root)     body                              reply
    llama-cpp-python   POST /extras/tokenize      {"input", "model"?}               {"tokens": [...]}
    vLLM               POST /tokenize             {"prompt", "add_special_tokens":  {"count", "tokens",
                                                   false, "model"?}                  "max_model_len"}

An engine with neither (4xx, or a reply of another shape, from both: e.g. the scripted fake engine)
is counted with `estimate_tokens` from then on, and a warning is logged once. A call that fails for
a passing reason (nothing listening, 5xx, `timeout_s` spent) is estimated too, but the engine is
asked again next time; estimates are never cached. `count` never raises for engine trouble: shaping must still
work, and the completion call reports the engine's state itself.

Why a short `timeout_s` (default 2 s): llama-cpp-python serves tokenize requests under the same lock
as completions, so while another answer is generating a count waits for it. Waiting the whole
answer out would let requests that arrived later queue their completions first.

Chat messages cost more than their text: `count_messages` adds ChatML's framing per message,
`<|im_start|>{role}\\n ... <|im_end|>\\n` (5 tokens with Qwen's vocabulary: the two specials, the
role, two newlines), and the `<|im_start|>assistant\\n` that primes the reply (3 tokens).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ValidationError

from backend.serving.engine import Message

logger = logging.getLogger(__name__)

CHATML_MESSAGE_OVERHEAD = 5
"""Tokens of `<|im_start|>{role}\\n` + `<|im_end|>\\n` around each message (Qwen's vocabulary)."""

CHATML_REPLY_PRIMER = 3
"""Tokens of the `<|im_start|>assistant\\n` that ends every chat prompt."""

ESTIMATE_LETTERS_PER_TOKEN = 3


class Tokenizer(Protocol):
    async def count(self, text: str) -> int:
        """Tokens in `text` as the engine's tokenizer splits it (no special tokens added)."""
        ...

    def known(self, text: str) -> int | None:
        """`count(text)` if it is at hand without asking anything (cached, or an estimate when
        that is all this tokenizer does), else None. Lets callers skip a task per count."""
        ...


def estimate_tokens(text: str) -> int:
    """An explicit, deliberately generous estimate: one token per 3 ASCII letters, one per any
    other character (CJK, digits, punctuation, spaces).

    Qwen's tokenizer needs ~0.7 tokens per Chinese character and ~0.25 per English letter, and
    splits digits one by one, so this overestimates and budgets built on it err on the safe side.
    """
    letters = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return -(-letters // ESTIMATE_LETTERS_PER_TOKEN) + len(text) - letters


class EstimateTokenizer:
    """A `Tokenizer` that never calls anything: `estimate_tokens`."""

    async def count(self, text: str) -> int:
        return estimate_tokens(text)

    def known(self, text: str) -> int:
        return estimate_tokens(text)


async def count_messages(tokenizer: Tokenizer, messages: Sequence[Message]) -> int:
    """Tokens of a whole chat prompt: every message's content and ChatML framing, plus the reply
    primer. Counts run concurrently."""
    counts = await asyncio.gather(*(tokenizer.count(m.content) for m in messages))
    return sum(counts) + CHATML_MESSAGE_OVERHEAD * len(messages) + CHATML_REPLY_PRIMER


class Dialect(enum.StrEnum):
    LLAMA_CPP_PYTHON = "llama-cpp-python"
    VLLM = "vllm"
    ESTIMATE = "estimate"  # the engine has no tokenize endpoint


class _TokensReply(BaseModel):
    tokens: list[int]


class _CountReply(BaseModel):
    count: int


@dataclass(frozen=True)
class _Endpoint:
    path: str
    text_field: str
    extra: tuple[tuple[str, object], ...]
    reply: type[_TokensReply] | type[_CountReply]


_ENDPOINTS: dict[Dialect, _Endpoint] = {
    Dialect.LLAMA_CPP_PYTHON: _Endpoint("/extras/tokenize", "input", (), _TokensReply),
    Dialect.VLLM: _Endpoint("/tokenize", "prompt", (("add_special_tokens", False),), _CountReply),
}
"""Tried in this order until one answers; see the module docstring."""


class _Absent(Exception):
    """The engine has no such endpoint (it answered 4xx, or with another shape)."""


class _Unreachable(Exception):
    """No answer this time: nothing listening, 5xx, or timeout."""


def _cache_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class EngineTokenizer:
    """The engine's tokenizer over HTTP, with an LRU cache of counts (`cache_size` texts, keyed by
    a digest). Safe to share between tasks; close with `aclose()` at shutdown.

    `base_url` is the engine's OpenAI URL (ending in /v1); the tokenize endpoints are looked up at
    the server root. `model`, when given, is sent as vLLM and llama-cpp-python expect it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 2.0,
        cache_size: int = 4096,
    ) -> None:
        self._root = base_url.rstrip("/").removesuffix("/v1")
        self._model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), headers=headers, trust_env=False
        )
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._cache_size = cache_size
        self._dialect: Dialect | None = None
        self._detecting = asyncio.Lock()
        self._failing = False

    @property
    def dialect(self) -> Dialect | None:
        """The endpoint in use, once detected; None until an engine has answered."""
        return self._dialect

    async def aclose(self) -> None:
        await self._http.aclose()

    def known(self, text: str) -> int | None:
        """See `Tokenizer.known`: the estimate once the engine has no tokenize endpoint, or a
        cached count."""
        if self._dialect is Dialect.ESTIMATE:
            return estimate_tokens(text)
        key = _cache_key(text)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
        return cached

    async def count(self, text: str) -> int:
        """See `Tokenizer.count`. Never raises for engine trouble (estimates instead)."""
        if (known := self.known(text)) is not None:
            return known
        key = _cache_key(text)
        try:
            if self._dialect is None:
                count = await self._detect(text)
            else:
                count = await self._ask(self._dialect, text)
        except (_Absent, _Unreachable) as exc:
            if not self._failing:
                logger.warning("tokenizer at %s failed (%s); estimating counts", self._root, exc)
            self._failing = True
            return estimate_tokens(text)
        if count is None:
            return estimate_tokens(text)
        if self._failing:
            logger.info("tokenizer at %s answers again", self._root)
            self._failing = False
        self._cache[key] = count
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return count

    async def _detect(self, text: str) -> int | None:
        """Find the dialect with `text` as the probe; its count, or None once it is ESTIMATE.

        Raises _Unreachable when an endpoint could not be asked (the next call tries again).
        """
        async with self._detecting:
            if self._dialect is Dialect.ESTIMATE:
                return None
            if self._dialect is not None:
                return await self._ask(self._dialect, text)
            unreachable: _Unreachable | None = None
            absent: list[str] = []
            for dialect in _ENDPOINTS:
                try:
                    count = await self._ask(dialect, text)
                except _Absent as exc:
                    absent.append(str(exc))
                    continue
                except _Unreachable as exc:
                    unreachable = exc
                    continue
                self._dialect = dialect
                logger.info("tokenizer at %s: %s", self._root, dialect)
                return count
            if unreachable is not None:
                raise unreachable
            self._dialect = Dialect.ESTIMATE
            logger.warning(
                "engine at %s has no tokenize endpoint (%s); counting tokens by estimate "
                "(1 per %d ASCII letters, 1 per other character)",
                self._root,
                "; ".join(absent),
                ESTIMATE_LETTERS_PER_TOKEN,
            )
            return None

    async def _ask(self, dialect: Dialect, text: str) -> int:
        """The count for `text`. Raises _Absent or _Unreachable."""
        endpoint = _ENDPOINTS[dialect]
        body: dict[str, Any] = {endpoint.text_field: text, **dict(endpoint.extra)}
        if self._model is not None:
            body["model"] = self._model
        try:
            response = await self._http.post(self._root + endpoint.path, json=body)
        except httpx.HTTPError as exc:
            raise _Unreachable(f"{endpoint.path}: {type(exc).__name__}") from exc
        if response.is_client_error:
            raise _Absent(f"{endpoint.path}: HTTP {response.status_code}")
        if not response.is_success:
            raise _Unreachable(f"{endpoint.path}: HTTP {response.status_code}")
        try:
            reply = endpoint.reply.model_validate_json(response.content)
        except ValidationError as exc:  # some other server's endpoint of that name
            raise _Absent(f"{endpoint.path}: a reply of another shape") from exc
        return len(reply.tokens) if isinstance(reply, _TokensReply) else reply.count


async def fit(
    tokenizer: Tokenizer, text: str, *, limit: int, tokens: int, head_share: float, marker: str
) -> tuple[str, int]:
    """`text` (of `tokens` tokens) cut to at most `limit` tokens, with its token count.

    Keeps whole characters from the head and the tail (`head_share` of them from the head: 1.0
    keeps the head only) and puts `marker`, formatted with `omitted` (characters left out), where
    the rest was. A few counting rounds: each shrinks the kept share by what the last one missed.
    If even nothing but the marker is over `limit`, that is returned.
    """
    size = len(text)
    keep = size * limit // max(tokens, 1)
    while True:
        keep = max(0, min(keep, size - 1))
        head = round(keep * head_share)
        candidate = text[:head] + marker.format(omitted=size - keep) + text[size - keep + head :]
        counted = await tokenizer.count(candidate)
        if counted <= limit or keep == 0:
            return candidate, counted
        keep = min(keep - 1, int(keep * limit / counted * 0.95))
