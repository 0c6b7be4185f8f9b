"""What the conversation pipeline tells the UI while it answers, in order of appearance:
Queued* → Retrieved? → Sentiment? → Notice* → Token* → Cited? → Done. The UI renders each; it
decides nothing."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from backend.chat.grounding import Sources
from backend.chat.sentiment import Sentiment
from backend.chat.shaping import Task, Tier
from backend.serving.queue import Position


class NoticeKind(enum.StrEnum):
    CONDENSED = "condensed"  # the input was too long; its middle was condensed
    DEGRADED = "degraded"  # under load: a shorter answer
    BUSY = "busy"  # no answer now; retry later
    BLOCKED_INPUT = "blocked_input"  # the message was refused by the guard; no engine call
    BLOCKED_OUTPUT = "blocked_output"  # the answer was stopped by the guard; replace it


class Outcome(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    REFUSED = "refused"
    BLOCKED = "blocked"


@dataclass(frozen=True)
class Queued:
    position: Position


@dataclass(frozen=True)
class SentimentLabel:
    label: Sentiment


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    text: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Retrieved:
    """Knowledge-base chats: the sources the answer will be given (numbered from 1)."""

    sources: Sources
    seconds: float


@dataclass(frozen=True)
class Cited:
    """Knowledge-base chats, after the answer: the source numbers it cited, in order of first
    citation, and how many citations to no source were removed."""

    sources: Sources
    cited: tuple[int, ...]
    removed: int


@dataclass(frozen=True)
class Token:
    """Answer text. `arrived`: when it came from the engine (`time.monotonic`), if it did; the
    guard may have held it back since (`backend/chat/pacing.py` evens the spacing out)."""

    text: str
    arrived: float | None = None


@dataclass(frozen=True)
class Done:
    outcome: Outcome
    replica: str | None
    tier: Tier
    task: Task | None
    prompt_tokens: int
    streamed: bool


Event = Queued | Retrieved | SentimentLabel | Notice | Token | Cited | Done
