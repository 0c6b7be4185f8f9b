"""Answer sanitizing: nothing in an answer makes the browser fetch a URL or run code.

Chainlit renders answers as Markdown (react-markdown with GFM and directives; raw HTML is shown as
text). A hostile answer -- a prompt injection riding in on a retrieved document, say -- could still
write `![x](https://tracker/p.png)`, which the browser fetches as soon as the answer renders (the
reader's address leaks, and the URL can carry whatever the model was told), or
`[点我](javascript:...)`. `MarkdownFilter` rewrites the answer while it streams:

- an image `![alt](url)` becomes its alt text (`[图片已移除]` when that is empty); any other `![`
  that a `](` further on in the same paragraph could still turn into an image gets its `!`
  escaped (`\\!`: it renders the same, as a link at most);
- a link whose destination has a scheme other than http, https or mailto (`javascript:`, `data:`,
  `vbscript:`, `file:` ...) becomes its text; where the link cannot be taken whole, the `(` after
  its `]` is escaped, so no link forms;
- an autolink `<javascript:...>` gets its `<` escaped: it shows as the text it is;
- a link reference definition `[r]: url` is escaped into plain text, so reference-style images and
  links (`![a][r]`, `![r]`, `[a][r]`) have nothing to point at.

Schemes are judged as the browser sees them: backslash escapes and character references decoded,
tabs and newlines dropped, leading blanks stripped. Every rule errs towards rewriting (a filter
that streams cannot know the whole document the renderer will parse), and the output is judged
as it will read, not as the input did: a replacement is inert text that pairs with nothing around
it, is never empty, and is set apart from an unclosed `<`; a destination whose scheme a later
rewrite could still change counts as disallowed. Benign Markdown -- code, lists, tables, http links,
text with `!` and `[` -- passes unchanged; lines inside a fenced code block opened at column 0
(where the renderer parses no Markdown) pass verbatim. Inline code is not exempt (where a code
span ends is not knowable while streaming), so `` `vec![1]` `` followed in its paragraph by a `](`
gains a backslash there.

Streaming: a construct is held back only until it is decided, at most `max_hold` characters;
one undecided by then is judged on those characters alone (which makes the output independent of
how the answer was cut into deltas). Line endings are normalised to `\\n`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple

from backend.chat.markdown_syntax import (
    ALLOWED_SCHEMES,
    PREFIX,
    PUNCT,
    Edge,
    Fence,
    Want,
    autolink,
    closer_ahead,
    dest_allowed,
    destination,
    fence_closes,
    fence_opens,
    inert,
    label_end,
    match_end,
    scheme_allowed,
    starts_definition,
)

MAX_HOLD = 1024  # characters a construct may be held back while it is undecided
IMAGE_REMOVED = "[图片已移除]"
LINK_REMOVED = "[链接已移除]"  # a removed link that had no text
_LINE_CAP = 4096  # characters of the current line kept to spot the end of an HTML block


class Removal(StrEnum):
    """What the filter rewrote (the label of `qwen_answer_sanitized_total`)."""

    IMAGE = "image"  # an image, or a `![` that could have become one
    LINK = "link"  # a link or autolink to a scheme other than http, https, mailto
    DEFINITION = "definition"  # a link reference definition


class _Step(NamedTuple):
    text: str  # the output
    used: int  # input characters it stands for
    removal: Removal | None = None  # what was rewritten, if anything
    replaces: bool = False  # a whole construct replaced by `text` (see `MarkdownFilter._joined`)


_SPECIAL = re.compile(r"[\\!\[\]<\n]")
_LAST_ANGLE_STOP = re.compile(r"[\x00-\x20<>](?=[^\x00-\x20<>]*\Z)")
_HTML_RAW = re.compile(r"<(?:script|pre|style|textarea)(?:[\s>]|$)", re.IGNORECASE)
_HTML_ENDS = (
    (_HTML_RAW, re.compile(r"</(?:script|pre|style|textarea)>", re.IGNORECASE)),
    (re.compile(r"<!--"), re.compile(r"-->")),
    (re.compile(r"<\?"), re.compile(r"\?>")),
    (re.compile(r"<!\[CDATA\["), re.compile(r"\]\]>")),
    (re.compile(r"<![A-Za-z]"), re.compile(r">")),
)


class MarkdownFilter:
    """Streams one answer through, rewritten as the module docstring says.

    Feed deltas in order; `feed` returns what may be shown now, `finish` the rest. `removed` counts
    the rewrites so far by kind. Not thread-safe: one per answer, fed from one task.
    Raises ValueError for a `max_hold` under 64.
    """

    def __init__(self, *, max_hold: int = MAX_HOLD) -> None:
        if max_hold < 64:
            raise ValueError("max_hold must be at least 64 characters")
        self.max_hold = max_hold
        self.removed: Counter[Removal] = Counter()
        self._held = ""  # normalised input not yet decided; starts where the output stopped
        self._cr = False  # a trailing \r held back: it may be half of \r\n
        self._line_start = True  # the output stands at the start of a line
        self._line = ""  # the output's current line so far (capped)
        self._fence: Fence | None = None  # inside a fenced code block opened at column 0
        self._fence_closing = False  # the current line may close it
        self._html = False  # the output may be inside an HTML block
        self._html_end: re.Pattern[str] | None = None  # that block waits for this, then a blank
        self._angle_open = False  # the output has a `<` not yet followed by a blank, `<` or `>`

    @property
    def holding(self) -> int:
        """Input characters held back (under `max_hold`)."""
        return len(self._held) + self._cr

    def feed(self, delta: str) -> str:
        return self._run(delta, final=False)

    def finish(self) -> str:
        """Everything still held, decided now that the answer is complete."""
        return self._run("", final=True)

    def _run(self, delta: str, *, final: bool) -> str:
        raw = "\r" * self._cr + delta
        self._cr = not final and raw.endswith("\r")
        raw = raw[:-1] if self._cr else raw
        text = self._held + raw.replace("\r\n", "\n").replace("\r", "\n")
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            if self._line_start:
                step = self._line_head(*self._window(text, i, final=final))
            elif self._fence is not None:  # code: verbatim to the end of the line
                stop = text.find("\n", i) + 1 or n
                self._emit(out, text[i:stop])
                i = stop
                continue
            else:
                special = _SPECIAL.search(text, i)
                stop = special.start() if special else n
                if stop > i:
                    self._emit(out, text[i:stop])
                    i = stop
                    continue
                step = self._special(*self._window(text, i, final=final))
            if step is None:
                break
            self._line_start = False
            self._emit(out, self._joined(step.text) if step.replaces else step.text)
            if step.removal is not None:
                self.removed[step.removal] += 1
            i += step.used
        self._held = text[i:]
        return "".join(out)

    def _window(self, text: str, i: int, *, final: bool) -> tuple[str, Edge]:
        window = text[i : i + self.max_hold]
        if len(window) >= self.max_hold:
            return window, Edge.FULL
        return window, Edge.END if final else Edge.OPEN

    def _line_head(self, w: str, edge: Edge) -> _Step | None:
        """At the start of an output line: does it open or close a code fence?"""
        if self._fence is not None:
            if not self._fence_closing:
                closes = fence_closes(w, self._fence)
                if closes is Want.MORE and edge is Edge.OPEN:
                    return None
                self._fence_closing = closes is not False  # undecided: closing (the safe side)
                return _Step("", 0)
            self._fence, self._fence_closing = None, False
        if not self._html and w[0] in "`~":
            fence = fence_opens(w, edge)
            if fence is Want.MORE:
                return None
            if isinstance(fence, Fence):
                self._fence = fence
        return _Step("", 0)

    def _special(self, w: str, edge: Edge) -> _Step | None:
        if w[0] == "[" and PREFIX.fullmatch(self._line):  # may start a reference definition
            definition = starts_definition(w, edge)
            if definition is None:
                return None
            if definition:
                return _Step("\\[", 1, Removal.DEFINITION)
        return _HANDLERS[w[0]](w, edge)

    def _joined(self, text: str) -> str:
        """A replacement as it may stand between what came before and what follows: never empty
        (`[x]` + `` + `(url)` would make a link), and set apart by a space after an unclosed `<`
        (`<javascript:` + `x` + `>` would make an autolink)."""
        text = text or inert(LINK_REMOVED)
        return " " + text if self._angle_open else text

    def _emit(self, out: list[str], text: str) -> None:
        if not text:
            return
        out.append(text)
        if angle := _LAST_ANGLE_STOP.search(text):
            self._angle_open = angle.group() == "<"
        *done, rest = text.split("\n")
        if done:
            self._end_line(self._line + done[0])
            for line in done[1:]:
                self._end_line(line)
            self._line = rest[:_LINE_CAP]
        else:
            self._line = (self._line + rest)[:_LINE_CAP]
        self._line_start = text.endswith("\n")

    def _end_line(self, line: str) -> None:
        """Follow HTML blocks in the output (a fence inside one is no fence). Generous: a block
        starts at any line beginning with `<` and lasts until its end marker, then a blank line."""
        if self._fence is not None:
            return
        if not line.strip(" \t"):
            if self._html_end is None:
                self._html = False
            return
        if self._html_end is not None and self._html_end.search(line):
            self._html_end = None
        head = line[match_end(PREFIX, line) :]
        if head.startswith("<") and not self._html:
            self._html = True
            end = next((e for start, e in _HTML_ENDS if start.match(head)), None)
            self._html_end = end if end is not None and not end.search(head, 1) else None


def sanitize(text: str) -> str:
    """The whole of `text` through a `MarkdownFilter` (for Markdown that does not stream)."""
    f = MarkdownFilter()
    return f.feed(text) + f.finish()


# --- handlers: each gets the window from its special character and returns a step, or None to
# --- wait for more text (never at a FULL or END edge) ---------------------------------------------


def _backslash(w: str, edge: Edge) -> _Step | None:
    if len(w) < 2:
        return None if edge is Edge.OPEN else _Step("\\", 1)
    return _Step(w[:2], 2) if w[1] in PUNCT else _Step("\\", 1)


def _newline(w: str, edge: Edge) -> _Step | None:
    return _Step("\n", 1)


def _bang(w: str, edge: Edge) -> _Step | None:
    if len(w) < 2:
        return None if edge is Edge.OPEN else _Step("!", 1)
    return _image(w, edge) if w[1] == "[" else _Step("!", 1)


def _image(w: str, edge: Edge) -> _Step | None:
    """`![alt](dest)` → the alt text. Otherwise the `!` stays only if no `](` follows in the
    paragraph (nothing could close the `![` as an inline image then, and reference forms have no
    definitions to use); else it is escaped, which leaves every bracket pair as it was."""
    close = label_end(w, 1)
    undecided = close is Want.MORE
    if isinstance(close, int):
        if close + 1 >= len(w):
            undecided = True
        elif w[close + 1] == "(":
            dest = destination(w, close + 2)
            if isinstance(dest, tuple):
                alt = w[2:close] if w[2:close].strip() else IMAGE_REMOVED
                return _Step(inert(alt), dest[0], Removal.IMAGE, replaces=True)
            undecided = dest is Want.MORE
    if undecided and edge is Edge.OPEN:
        return None
    ahead = closer_ahead(w, 2)
    if ahead is Want.MORE:
        if edge is Edge.OPEN:
            return None
        ahead = edge is Edge.FULL
    return _Step("\\!", 1, Removal.IMAGE) if ahead else _Step("!", 1)


def _bracket(w: str, edge: Edge) -> _Step | None:
    """`[text](dest)` with a disallowed scheme → the text. Anything else keeps its `[` (`_close`
    still stops a link this could not take whole)."""
    keep = _Step("[", 1)
    close = label_end(w, 0)
    if close is Want.MORE or (isinstance(close, int) and close + 1 >= len(w)):
        return None if edge is Edge.OPEN else keep
    if close is Want.NO or w[close + 1] != "(":
        return keep
    assert isinstance(close, int)
    allowed = dest_allowed(w, close + 2)
    if allowed is True:
        return keep
    dest = destination(w, close + 2)
    if allowed is Want.MORE or dest is Want.MORE:
        return None if edge is Edge.OPEN else keep
    if isinstance(dest, tuple) and not scheme_allowed(dest[1]):
        return _Step(inert(w[1:close]), dest[0], Removal.LINK, replaces=True)
    return keep


def _close(w: str, edge: Edge) -> _Step | None:
    """`](` before a destination with a disallowed scheme: escape the `(`, so no link forms (and
    the `]` still pairs with the `[` it did)."""
    if len(w) < 2:
        return None if edge is Edge.OPEN else _Step("]", 1)
    if w[1] != "(":
        return _Step("]", 1)
    allowed = dest_allowed(w, 2)
    if allowed is Want.MORE:
        if edge is Edge.OPEN:
            return None
        allowed = False
    return _Step("]", 1) if allowed else _Step("]\\(", 2, Removal.LINK)


def _angle(w: str, edge: Edge) -> _Step | None:
    """`<scheme:...>` with a disallowed scheme: escape the `<`, so it renders as the text it is."""
    scheme = autolink(w)
    if scheme is Want.MORE:
        if edge is Edge.OPEN:
            return None
        defuse = edge is Edge.FULL  # undecided at a full window: the safe side
    else:
        defuse = isinstance(scheme, str) and scheme.lower() not in ALLOWED_SCHEMES
    return _Step("\\<", 1, Removal.LINK) if defuse else _Step("<", 1)


_HANDLERS: dict[str, Callable[[str, Edge], _Step | None]] = {
    "\\": _backslash,
    "\n": _newline,
    "!": _bang,
    "[": _bracket,
    "]": _close,
    "<": _angle,
}
