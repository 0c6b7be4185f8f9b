"""How CommonMark reads the few constructs the answer filter (`backend/chat/markdown.py`) rewrites:
images, links and their destinations, autolinks, link reference definitions, code fences.

Every reader works on a window of text that may stop before the construct does and then answers
`Want.MORE`; once it answers anything else, more text cannot change the answer (which is what
makes the filter's output independent of how the answer was cut into deltas). Where a reader
cannot be exact it errs the way the filter needs: towards rewriting more.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from enum import Enum, auto

ALLOWED_SCHEMES = frozenset({"http", "https", "mailto"})
PREFIX = re.compile(r"[ \t>+*\-\d.)]*")  # indentation, quote and list markers (generously)
PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_AHEAD = re.compile(r"[\]\n]")
_SPACES = re.compile(r"[ \t]*")
_WHITESPACE = re.compile(r"\s*")
_FOOTNOTE = re.compile(r"\[\^[^\s\[\]\\]+\]")
_TRIGGERS = frozenset("![]<")  # where a rewrite may start
_C0_AND_SPACE = "".join(map(chr, range(0x21)))
_DEST_STOPS = _C0_AND_SPACE + "\x7f)![]<"  # where a raw destination ends or a rewrite may start
_OPEN_SCHEME = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.\-]*)?")  # a scheme could still follow
_OPEN_REFERENCE = re.compile(r"&[#A-Za-z0-9]*\Z")  # a character reference could still end
_AUTOLINK_HEAD = re.compile(r"<([A-Za-z][A-Za-z0-9+.\-]*)")
_AUTOLINK_END = re.compile(r"[\x00-\x20<>]")
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")
_TAB_NEWLINE = re.compile(r"[\t\n\r]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_INERT = re.compile(r"\\[!-/:-@\[-`{-~]|[\[\]()!<>`]")


class Want(Enum):
    """A reader's answer when it has none yet, or definitely none."""

    MORE = auto()  # the window ends before the construct is decided
    NO = auto()  # definitely not the construct


class Edge(Enum):
    """Where the window ends."""

    OPEN = auto()  # more text may follow the window: an undecided construct waits
    FULL = auto()  # the window is `max_hold` long: an undecided construct is judged now
    END = auto()  # the answer ends inside the window


@dataclass(frozen=True)
class Fence:
    """An open code fence: its character (`` ` `` or `~`) and how many."""

    char: str
    length: int


def match_end(pattern: re.Pattern[str], w: str, j: int = 0) -> int:
    """Where a pattern that may match nothing, matched at `j`, ends."""
    match = pattern.match(w, j)
    return match.end() if match else j


def blank_at(w: str, j: int) -> bool | Want:
    """Whether the line ending at `j` is followed by a blank line (which ends a paragraph)."""
    k = match_end(_SPACES, w, j + 1)
    return Want.MORE if k >= len(w) else w[k] == "\n"


def scan(w: str, j: int, stops: str, *, paragraph: bool = False) -> int | Want:
    """The first unescaped character from `j` in `stops`; with `paragraph`, NO at a blank line."""
    while j < len(w):
        c = w[j]
        if c == "\\":
            if j + 1 >= len(w):
                return Want.MORE
            j += 2 if w[j + 1] in PUNCT else 1
            continue
        if c in stops:
            return j
        if paragraph and c == "\n" and (blank := blank_at(w, j)) is not False:
            return Want.NO if blank is True else Want.MORE
        j += 1
    return Want.MORE


def label_end(w: str, start: int) -> int | Want:
    """The `]` closing the `[` at `start` (brackets balanced, escapes honoured); NO at a blank."""
    depth, j = 0, start
    while isinstance(stop := scan(w, j, "[]", paragraph=True), int):
        depth += 1 if w[stop] == "[" else -1
        if depth == 0:
            return stop
        j = stop + 1
    return stop


def closer_ahead(w: str, start: int) -> bool | Want:
    """Whether a `](` comes before the paragraph ends."""
    j = start
    while stop := _AHEAD.search(w, j):
        j = stop.start()
        if w[j] == "]":
            if j + 1 >= len(w):
                return Want.MORE
            if w[j + 1] == "(":
                return True
        elif (blank := blank_at(w, j)) is not False:
            return False if blank is True else Want.MORE
        j += 1
    return Want.MORE


def _skip_blank(w: str, j: int) -> int | Want:
    """Past spaces, tabs and at most one line ending; NO at a blank line."""
    j = match_end(_SPACES, w, j)
    if j < len(w) and w[j] == "\n":
        j = match_end(_SPACES, w, j + 1)
        if j < len(w) and w[j] == "\n":
            return Want.NO
    return Want.MORE if j >= len(w) else j


def _raw_destination_end(w: str, j: int) -> int | Want:
    depth = 0
    while j < len(w):
        c = w[j]
        if c == "\\":
            if j + 1 >= len(w):
                return Want.MORE
            j += 2 if w[j + 1] in PUNCT else 1
            continue
        if c <= " " or c == "\x7f" or (c == ")" and depth == 0):
            return j
        depth += (c == "(") - (c == ")")
        j += 1
    return Want.MORE


def destination(w: str, start: int) -> tuple[int, str] | Want:
    """`dest "title")` from just after `(`, read as CommonMark does (a little more generously):
    (index after the `)`, dest)."""
    j = _skip_blank(w, start)
    if not isinstance(j, int):
        return j
    if w[j] == ")":
        return j + 1, ""
    if w[j] == "<":
        end = scan(w, j + 1, "<>\n")
        if not isinstance(end, int) or w[end] != ">":
            return Want.NO if isinstance(end, int) else end
        dest, j = w[j + 1 : end], end + 1
    else:
        end = _raw_destination_end(w, j)
        if not isinstance(end, int) or end == j:
            return Want.NO if isinstance(end, int) else end
        dest, j = w[j:end], end
    after = _skip_blank(w, j)
    if not isinstance(after, int) or w[after] == ")":
        return (after + 1, dest) if isinstance(after, int) else after
    if after == j or w[after] not in "\"'(":
        return Want.NO
    closing = ")" if w[after] == "(" else w[after]
    end = scan(w, after + 1, closing + "(" * (closing == ")"), paragraph=True)
    if not isinstance(end, int) or w[end] != closing:
        return Want.NO if isinstance(end, int) else end
    tail = _skip_blank(w, end + 1)
    if not isinstance(tail, int):
        return tail
    return (tail + 1, dest) if w[tail] == ")" else Want.NO


def dest_allowed(w: str, start: int) -> bool | Want:
    """Whether the destination after `(` has an allowed scheme or none, as it will read once
    what follows is rewritten: a rewrite (at `!`, `[`, `]`, `<`) before the scheme is settled
    could still make one, so that counts as disallowed."""
    j = match_end(_WHITESPACE, w, start)
    if j >= len(w):
        return Want.MORE
    angled = w[j] == "<"
    end = scan(w, j + angled, "<>\n![]" if angled else _DEST_STOPS)
    if not isinstance(end, int):
        return end
    dest = w[j + angled : end]
    return bool(_settled(dest)) if w[end] in _TRIGGERS else scheme_allowed(dest)


def _settled(prefix: str) -> bool | None:
    """Whether a destination starting with `prefix` is allowed whatever follows (None: what
    follows decides)."""
    url = html.unescape(_ESCAPED.sub(r"\1", prefix))
    url = _TAB_NEWLINE.sub("", url).lstrip(_C0_AND_SPACE)
    if _SCHEME.match(url):
        return scheme_allowed(prefix)
    if _OPEN_SCHEME.fullmatch(url) or _OPEN_REFERENCE.search(prefix):
        return None
    return True


def scheme_allowed(dest: str) -> bool:
    """A destination, as the browser reads it, has no scheme, or http, https or mailto."""
    url = html.unescape(_ESCAPED.sub(r"\1", dest))
    url = _TAB_NEWLINE.sub("", url).lstrip(_C0_AND_SPACE)
    scheme = _SCHEME.match(url)
    return scheme is None or scheme.group(1).lower() in ALLOWED_SCHEMES


def autolink(w: str) -> str | Want:
    """The scheme of the autolink `<scheme:rest>` opening `w`, as CommonMark reads it."""
    head = _AUTOLINK_HEAD.match(w)
    if head is None:
        return Want.MORE if len(w) < 2 else Want.NO
    colon = head.end()
    if colon >= len(w):
        return Want.MORE
    if w[colon] != ":" or not 2 <= len(head.group(1)) <= 32:
        return Want.NO
    end = _AUTOLINK_END.search(w, colon + 1)
    if end is None:
        return Want.MORE
    return head.group(1) if w[end.start()] == ">" else Want.NO


def starts_definition(w: str, edge: Edge) -> bool | None:
    """Whether the `[` opening `w`, with only indentation and quote or list markers before it on
    its line, may start a link reference definition (`[label]:`; footnotes `[^n]:` excepted).
    None: not known yet; undecided at a full window: yes (the safe side)."""
    close = label_end(w, 0)
    if close is Want.MORE or (isinstance(close, int) and close + 1 >= len(w)):
        return None if edge is Edge.OPEN else edge is Edge.FULL
    if not isinstance(close, int) or w[close + 1] != ":":
        return False
    return not _FOOTNOTE.fullmatch(w, 0, close + 1)


def fence_opens(w: str, edge: Edge) -> Fence | Want:
    """A code fence at column 0: ```` ``` ```` with no backtick after it, or `~~~`."""
    char = w[0]
    run = len(w) - len(w.lstrip(char))
    if run >= len(w):
        return Want.MORE if edge is Edge.OPEN else Want.NO
    if run < 3:
        return Want.NO
    if char == "`":
        newline = w.find("\n", run)
        if "`" in w[run : newline if newline >= 0 else len(w)]:
            return Want.NO
        if newline < 0 and edge is not Edge.END:
            return Want.MORE if edge is Edge.OPEN else Want.NO
    return Fence(char, run)


def fence_closes(w: str, fence: Fence) -> bool | Want:
    """Whether this line may close the fence (generously: any indentation, anything after it;
    a directive container's `:::` too, since it ends the fences inside it)."""
    rest = w[match_end(_SPACES, w) :]
    run = len(rest) - len(rest.lstrip(fence.char))
    if rest.startswith(":::") or run >= fence.length:
        return True
    if run == len(rest) or (len(rest) < 3 and ":::".startswith(rest)):
        return Want.MORE
    return False


def inert(markdown: str) -> str:
    """Markdown with every bracket, parenthesis, `!`, `<`, `>` and backtick escaped: it renders
    as text and pairs with nothing around it."""
    return _INERT.sub(lambda m: m.group() if len(m.group()) == 2 else "\\" + m.group(), markdown)
