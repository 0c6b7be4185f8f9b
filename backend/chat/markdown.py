"""Answer sanitizing: nothing in an answer makes the browser fetch a URL or run code, and its links
lead only to allow-listed hosts.

Chainlit renders answers as Markdown (react-markdown with GFM and directives; raw HTML is shown as
text). A hostile answer -- a prompt injection riding in on a retrieved document, say -- could still
write `![x](https://tracker/p.png)`, which the browser fetches as soon as the answer renders (the
reader's address leaks, and the URL can carry whatever the model was told), `[点我](javascript:...)`,
or a link to a phishing page. `MarkdownFilter(link_hosts=...)` rewrites the answer while it streams:

- an image `![alt](url)` becomes its alt text (`[图片已移除]` when that is empty); any other `![`
  that a `](` further on in the same paragraph could still turn into an image gets its `!`
  escaped (`\\!`: it renders the same, as a link at most);
- a link whose destination has a scheme other than http, https or mailto (`javascript:`, `data:`,
  `vbscript:`, `file:` ...), or an http(s) host not in `link_hosts`, becomes its text; where the
  link cannot be taken whole, the `(` after its `]` is escaped, so no link forms. Destinations
  without a host (`/x`, `../x`, `#x`, `?q`) stay: they lead to the chat UI's own origin; so do
  `mailto:` links, whatever the address;
- an autolink `<javascript:...>` or `<https://other.host/>` gets its `<` escaped: it shows as the
  text it is;
- a bare URL that GFM would make a link of (`https://other.host/x`, `www.other.host`) gets a word
  joiner (U+2060, invisible) after its `:` or `www`: it shows as before, but no link forms. A bare
  URL to an allowed host followed by more than trailing punctuation (`https://ok.host)中文`, which
  GFM would read into the host) gets a `/` after the host instead: the same URL, ending there;
- a link reference definition `[r]: url` is escaped into plain text, so reference-style images and
  links (`![a][r]`, `![r]`, `[a][r]`) have nothing to point at.

`link_hosts` entries are host names (`example.com`) or, with a leading dot (`.example.com`), a
host and its subdomains; empty (the default), no http(s) link survives. Schemes and hosts are
judged as the browser reads them: backslash escapes and character references decoded, tabs and
newlines dropped, blanks stripped; the host as WHATWG URL finds it (`\\` counts as `/`; `//host`,
`https:host` and `https:\\\\host` name one; user info, port, one trailing dot and case are set
aside), and also as it reads the percent-encoded href the renderer emits (`\\` → `%5C`): both
readings must allow it. A host with percent signs or other letters than ASCII never matches (no
IDNA). Backslash escapes do not stop GFM's bare URLs: remark-gfm finds them in the decoded text,
so `https\\://x` is still a link (remarkjs/remark-gfm#33) -- hence the word joiner.

Every rule errs towards rewriting (a filter that streams cannot know the whole document the
renderer will parse), and the output is judged as it will read, not as the input did: a
replacement is inert text that pairs with nothing around it, is never empty, is set apart from an
unclosed `<` and from a `&` it could complete into a character reference, and has its bare URLs
judged too; a destination whose scheme or host a later rewrite could still change counts as
disallowed. Benign Markdown -- code, lists, tables, links to allowed hosts, text with `!` and `[`
-- passes unchanged; lines inside a fenced code block opened at column 0 (where the renderer
parses no Markdown) pass verbatim. Inline code is not exempt (where a code span ends is not
knowable while streaming), so `` `vec![1]` `` followed in its paragraph by a `](` gains a
backslash there, and a URL to another host in inline code or in an indented code block gains the
word joiner. So does a URL inside an allowed link's destination (`?next=https://other.host`), and
an allowed link with user info (`https://user@ok.host`) is broken the same way: bare URLs are
judged wherever they stand.

Streaming: a construct is held back only until it is decided, at most `max_hold` characters;
one undecided by then is judged on those characters alone (which makes the output independent of
how the answer was cut into deltas). Line endings are normalised to `\\n`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import NamedTuple

from backend.chat.markdown_syntax import (
    ALLOWED_SCHEMES,
    OPEN_REFERENCE,
    PREFIX,
    PUNCT,
    WORD_JOINER,
    Edge,
    Fence,
    LinkHosts,
    Want,
    autolink_url,
    bare_url,
    closer_ahead,
    decode,
    dest_allowed,
    destination,
    fence_closes,
    fence_opens,
    host_allowed,
    inert,
    label_end,
    match_end,
    starts_definition,
    url_allowed,
)

MAX_HOLD = 1024  # characters a construct may be held back while it is undecided
IMAGE_REMOVED = "[图片已移除]"
LINK_REMOVED = "[链接已移除]"  # a removed link that had no text
_LINE_CAP = 4096  # characters of the current line kept to spot the end of an HTML block
_TAIL = 128  # characters of output kept to read what a bare URL's `/` or `.` follows


class Removal(StrEnum):
    """What the filter rewrote (the label of `qwen_answer_sanitized_total`)."""

    IMAGE = "image"  # an image, or a `![` that could have become one
    LINK = "link"  # a link, autolink or bare URL to another scheme or host than allowed
    DEFINITION = "definition"  # a link reference definition


class _Step(NamedTuple):
    text: str  # the output
    used: int  # input characters it stands for
    removal: Removal | None = None  # what was rewritten, if anything
    replaces: bool = False  # a whole construct replaced by `text` (`MarkdownFilter._replacement`)


_SPECIAL = re.compile(r"[\\!\[\]<\n/.&]")
_URL_TRIGGER = re.compile(r"[\\/.&]")
_REFERENCE_GOES_ON = re.compile(r"[#A-Za-z0-9;]")
_BLANK = re.compile(r"[ \t\n]")
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
    the rewrites so far by kind. `link_hosts`: the hosts http(s) links may lead to (`example.com`,
    or `.example.com` for it and its subdomains; none by default). Not thread-safe: one per
    answer, fed from one task. Raises ValueError for a `max_hold` under 64 or a malformed host.
    """

    def __init__(self, *, max_hold: int = MAX_HOLD, link_hosts: Iterable[str] = ()) -> None:
        if max_hold < 64:
            raise ValueError("max_hold must be at least 64 characters")
        self.max_hold = max_hold
        self.removed: Counter[Removal] = Counter()
        self._hosts = LinkHosts(link_hosts)
        self._tail = ""  # the output's last `_TAIL` characters
        self._link_counted = False  # a link removal was counted since the output's last blank
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
                if text[i] in "/.&" and not self._may_open_url(text[i]):
                    self._emit(out, text[i])  # the common `.` and `/`, at once
                    i += 1
                    continue
                step = self._special(*self._window(text, i, final=final))
            if step is None:
                break
            self._line_start = False
            if step.removal is not None:
                self._count(step.removal)
            self._emit(out, self._replacement(step.text) if step.replaces else step.text)
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
        if w[0] in "/.&" or (w[0] == "\\" and w[1:2] in ("/", ".") and self._may_open_url(w[1])):
            return self._bare_url(w, edge)
        return _HANDLERS[w[0]](w, edge, self._hosts)

    def _may_open_url(self, c: str) -> bool:
        """Whether a `/`, `.` or `&` here may follow `http:` / `https:` or `www` (whose last
        character, or a reference's `;`, the output must then end with)."""
        return self._tail[-1:] in {"/": ":;", ".": "wW;", "&": ":;wW"}[c]

    def _bare_url(self, w: str, edge: Edge) -> _Step | None:
        """A `/` or `.` (or what stands for one) that may open a bare URL GFM would make a link
        of: broken with a word joiner unless its host is allowed (`bare_url`)."""
        url = bare_url(decode(self._tail), w, self._hosts, edge)
        if url is Want.MORE:
            return None
        assert not isinstance(url, Want)
        counted = url.defused and not self._link_counted
        return _Step(url.text, url.used, Removal.LINK if counted else None)

    def _replacement(self, text: str) -> str:
        """A replacement as it may stand between what came before and what follows: never empty
        (`[x]` + `` + `(url)` would make a link), set apart by a space after an unclosed `<`
        (`<javascript:` + `x` + `>` would make an autolink) and by a word joiner from a `&` it
        could complete into a character reference (`&#4` + `7;` would make a `/`); bare URLs in
        it are judged as those in the answer are, as if anything could follow."""
        text = text or inert(LINK_REMOVED)
        if self._angle_open:
            text = " " + text
        elif OPEN_REFERENCE.search(self._tail) and _REFERENCE_GOES_ON.match(text):
            text = WORD_JOINER + text
        out: list[str] = []
        tail, i = self._tail, 0
        while trigger := _URL_TRIGGER.search(text, i):
            j = trigger.start()
            tail = (tail + text[i:j])[-_TAIL:]
            url = bare_url(decode(tail), text[j:], self._hosts, Edge.FULL)
            assert not isinstance(url, Want)  # a full window is always decided
            if url.defused and not self._link_counted:
                self._count(Removal.LINK)
            out.append(text[i:j] + url.text)
            tail = (tail + url.text)[-_TAIL:]
            i = j + max(url.used, 1)
        out.append(text[i:])
        return "".join(out)

    def _count(self, removal: Removal) -> None:
        self.removed[removal] += 1
        self._link_counted = self._link_counted or removal is Removal.LINK

    def _emit(self, out: list[str], text: str) -> None:
        if not text:
            return
        out.append(text)
        self._tail = (self._tail + text)[-_TAIL:]
        if _BLANK.search(text):
            self._link_counted = False
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


def sanitize(text: str, *, link_hosts: Iterable[str] = ()) -> str:
    """The whole of `text` through a `MarkdownFilter` (for Markdown that does not stream)."""
    f = MarkdownFilter(link_hosts=link_hosts)
    return f.feed(text) + f.finish()


# --- handlers: each gets the window from its special character and returns a step, or None to
# --- wait for more text (never at a FULL or END edge) ---------------------------------------------


def _backslash(w: str, edge: Edge, hosts: LinkHosts) -> _Step | None:
    if len(w) < 2:
        return None if edge is Edge.OPEN else _Step("\\", 1)
    return _Step(w[:2], 2) if w[1] in PUNCT else _Step("\\", 1)


def _newline(w: str, edge: Edge, hosts: LinkHosts) -> _Step | None:
    return _Step("\n", 1)


def _bang(w: str, edge: Edge, hosts: LinkHosts) -> _Step | None:
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


def _bracket(w: str, edge: Edge, hosts: LinkHosts) -> _Step | None:
    """`[text](dest)` with a disallowed scheme or host → the text. Anything else keeps its `[`
    (`_close` still stops a link this could not take whole)."""
    keep = _Step("[", 1)
    close = label_end(w, 0)
    if close is Want.MORE or (isinstance(close, int) and close + 1 >= len(w)):
        return None if edge is Edge.OPEN else keep
    if close is Want.NO or w[close + 1] != "(":
        return keep
    assert isinstance(close, int)
    allowed = dest_allowed(w, close + 2, hosts)
    if allowed is True:
        return keep
    dest = destination(w, close + 2)
    if allowed is Want.MORE or dest is Want.MORE:
        return None if edge is Edge.OPEN else keep
    if isinstance(dest, tuple) and not url_allowed(dest[1], hosts):
        return _Step(inert(w[1:close]), dest[0], Removal.LINK, replaces=True)
    return keep


def _close(w: str, edge: Edge, hosts: LinkHosts) -> _Step | None:
    """`](` before a destination with a disallowed scheme or host: escape the `(`, so no link
    forms (and the `]` still pairs with the `[` it did)."""
    if len(w) < 2:
        return None if edge is Edge.OPEN else _Step("]", 1)
    if w[1] != "(":
        return _Step("]", 1)
    allowed = dest_allowed(w, 2, hosts)
    if allowed is Want.MORE:
        if edge is Edge.OPEN:
            return None
        allowed = False
    return _Step("]", 1) if allowed else _Step("]\\(", 2, Removal.LINK)


def _angle(w: str, edge: Edge, hosts: LinkHosts) -> _Step | None:
    """`<scheme:...>` with a disallowed scheme or host: escape the `<`, so it renders as the text
    it is (the bare URL left in it is judged like any other)."""
    url = autolink_url(w)
    if url is Want.MORE:
        if edge is Edge.OPEN:
            return None
        defuse = edge is Edge.FULL  # undecided at a full window: the safe side
    else:
        defuse = isinstance(url, str) and not (
            url.partition(":")[0].lower() in ALLOWED_SCHEMES and host_allowed(url, hosts)
        )
    return _Step("\\<", 1, Removal.LINK) if defuse else _Step("<", 1)


_HANDLERS: dict[str, Callable[[str, Edge, LinkHosts], _Step | None]] = {
    "\\": _backslash,
    "\n": _newline,
    "!": _bang,
    "[": _bracket,
    "]": _close,
    "<": _angle,
}
