"""How CommonMark reads the few constructs the answer filter (`backend/chat/markdown.py`) rewrites:
images, links and their destinations, autolinks, link reference definitions, code fences; how the
browser reads a link's host (WHATWG URL); and where GFM turns bare text into a link.

Every reader works on a window of text that may stop before the construct does and then answers
`Want.MORE`; once it answers anything else, more text cannot change the answer (which is what
makes the filter's output independent of how the answer was cut into deltas). Where a reader
cannot be exact it errs the way the filter needs: towards rewriting more.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, auto
from html.entities import html5
from typing import Literal, NamedTuple

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
OPEN_REFERENCE = re.compile(r"&[#A-Za-z0-9]*\Z")  # a character reference could still end
_AUTOLINK_HEAD = re.compile(r"<([A-Za-z][A-Za-z0-9+.\-]*)")
_AUTOLINK_END = re.compile(r"[\x00-\x20<>]")
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")
_TAB_NEWLINE = re.compile(r"[\t\n\r]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_INERT = re.compile(r"\\[!-/:-@\[-`{-~]|[\[\]()!<>`]")
_REFERENCE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{0,31});")
_ESCAPE_OR_REFERENCE = re.compile(r"\\([!-/:-@\[-`{-~])|(" + _REFERENCE.pattern + ")")
_REFERENCE_PREFIX = re.compile(r"&(?:#[0-9]{0,7}|#[xX][0-9a-fA-F]{0,6}|[A-Za-z][A-Za-z0-9]{0,31})?")
_HOST_ENTRY = re.compile(r"\.?[a-z0-9-]+(?:\.[a-z0-9-]+)*")
_HOST = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")
_BARE_AUTHORITY = re.compile(r"([A-Za-z0-9.-]+)(?::[0-9]*)?")
_HTTP = frozenset({"http", "https"})  # the schemes whose host the allow-list judges
_AUTHORITY_ENDS = "/?#"
_RUN_ENDS = " \t\n"  # what ends a GFM autolink literal (the transform's `[^ \t\r\n]*`)
_TRAIL = frozenset("!\"'),.:;<?]")  # trailing punctuation both of GFM's ways leave out of a link
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:")
_DIGITS = frozenset("0123456789")
WORD_JOINER = "\u2060"  # invisible; GFM makes no link across it (`https:⁠//x`, `www⁠.x`)


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


def link_host(entry: str) -> str:
    """An allow-list entry, normalised: `Example.COM.` → `example.com`; `.example.com` stands for
    that host and its subdomains. Raises ValueError for anything but a host name or IPv4 address
    (a URL, a port, a wildcard ...)."""
    host = entry.strip().lower()
    host = host[:-1] if len(host) > 1 and host.endswith(".") else host
    if not _HOST_ENTRY.fullmatch(host):
        raise ValueError(
            f"link host {entry!r}: write a host name such as example.com, "
            "or .example.com for it and its subdomains"
        )
    return host


class LinkHosts:
    """The hosts answers may link to (see `link_host` for the entries)."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        hosts = [link_host(entry) for entry in entries]
        self._names = frozenset(h.lstrip(".") for h in hosts)
        self._domains = tuple(h for h in hosts if h.startswith("."))

    def __contains__(self, host: object) -> bool:
        """Whether `host` (lower case, no trailing dot) is on the list: a plain host name that is
        an entry, or ends in a `.example.com` entry."""
        return (
            isinstance(host, str)
            and _HOST.fullmatch(host) is not None
            and (host in self._names or host.endswith(self._domains))
        )


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


def dest_allowed(w: str, start: int, hosts: LinkHosts | None = None) -> bool | Want:
    """Whether the destination after `(` has an allowed scheme or none (and, given `hosts`, an
    allowed host or none: `url_allowed`), as it will read once what follows is rewritten: a
    rewrite (at `!`, `[`, `]`, `<`) before the scheme and host are settled could still change
    them, so that counts as disallowed."""
    j = match_end(_WHITESPACE, w, start)
    if j >= len(w):
        return Want.MORE
    angled = w[j] == "<"
    end = scan(w, j + angled, "<>\n![]" if angled else _DEST_STOPS)
    if not isinstance(end, int):
        return end
    dest = w[j + angled : end]
    return bool(_settled(dest, hosts)) if w[end] in _TRIGGERS else url_allowed(dest, hosts)


def _settled(prefix: str, hosts: LinkHosts | None) -> bool | None:
    """Whether a destination starting with `prefix` is allowed whatever follows (None: what
    follows decides)."""
    url = html.unescape(_ESCAPED.sub(r"\1", prefix))
    url = _TAB_NEWLINE.sub("", url).lstrip(_C0_AND_SPACE)
    if _SCHEME.match(url):
        if not scheme_allowed(prefix):
            return False
    elif _OPEN_SCHEME.fullmatch(url) or OPEN_REFERENCE.search(prefix):
        return None
    return True if hosts is None else host_allowed(decode(prefix), hosts, complete=False)


def scheme_allowed(dest: str) -> bool:
    """A destination, as the browser reads it, has no scheme, or http, https or mailto."""
    url = html.unescape(_ESCAPED.sub(r"\1", dest))
    url = _TAB_NEWLINE.sub("", url).lstrip(_C0_AND_SPACE)
    scheme = _SCHEME.match(url)
    return scheme is None or scheme.group(1).lower() in ALLOWED_SCHEMES


def url_allowed(dest: str, hosts: LinkHosts | None) -> bool:
    """A destination (as written: escapes and character references not yet decoded) has an
    allowed scheme or none, and, unless `hosts` is None, leads to a host on it or stays on the
    page's own origin (`host_allowed`)."""
    return scheme_allowed(dest) and (hosts is None or host_allowed(decode(dest), hosts) is True)


def host_allowed(url: str, hosts: LinkHosts, *, complete: bool = True) -> bool | None:
    """Whether the link `url` (decoded: the text its href will hold) stays on the page's origin
    or leads to a host in `hosts`. Other schemes than http and https have no host to judge here
    (True). Read as the browser reads an href (WHATWG URL: blanks stripped, tabs and newlines
    dropped, `\\` as `/`, `//host` and `https:host` naming a host, user info and port set
    aside, lower case, one trailing dot dropped) and as it reads the percent-encoded href
    Markdown renderers emit (`\\` → `%5C`, an ordinary character): both must allow it. Hosts
    in other letters than ASCII or with percent signs never match. With `complete` False, `url`
    may be cut short: None then means what follows decides."""
    url = _TAB_NEWLINE.sub("", url)
    url = url.strip(_C0_AND_SPACE) if complete else url.lstrip(_C0_AND_SPACE)
    readings = [_reading_allowed(url, hosts, slashes, complete) for slashes in ("/\\", "/")]
    if False in readings:
        return False
    return None if None in readings else True


def _reading_allowed(url: str, hosts: LinkHosts, slashes: str, complete: bool) -> bool | None:
    scheme = _SCHEME.match(url)
    if scheme is not None:
        if scheme.group(1).lower() not in _HTTP:
            return True
        j = scheme.end()  # `https:` is followed by a host, however many slashes come first
    elif len(url) >= 2 and url[0] in slashes and url[1] in slashes:
        j = 0  # `//host/...`: another host, the page's scheme
    elif not complete and len(url) < 2 and all(c in slashes for c in url):
        return None
    else:
        return True  # a path on the page's own origin
    while j < len(url) and url[j] in slashes:
        j += 1
    ends = _AUTHORITY_ENDS + ("\\" if "\\" in slashes else "")
    end = next((k for k in range(j, len(url)) if url[k] in ends), None)
    if end is None:
        if not complete:
            return None
        end = len(url)
    host = url[j:end].rpartition("@")[2].partition(":")[0].lower()
    return (host[:-1] if host.endswith(".") else host) in hosts


def _decode_reference(reference: str) -> str | None:
    """A character reference as CommonMark decodes it (None: not a known entity)."""
    if reference[1] != "#":
        return html5.get(reference[1:])
    code = int(reference[3:-1], 16) if reference[2] in "xX" else int(reference[2:-1])
    invalid = code == 0 or 0xD800 <= code <= 0xDFFF or code > 0x10FFFF
    return "\ufffd" if invalid else chr(code)


def decode_at(w: str, j: int, edge: Edge) -> tuple[str, int] | Literal[Want.MORE] | None:
    """The text the character (or backslash escape, or character reference) at `w[j]` stands
    for in Markdown text, and how many characters it takes. MORE: an escape or reference that
    the window cuts; None: the window ends at `j` (at an OPEN edge: MORE)."""
    if j >= len(w):
        return Want.MORE if edge is Edge.OPEN else None
    c = w[j]
    if c == "\\":
        if j + 1 < len(w):
            return (w[j + 1], 2) if w[j + 1] in PUNCT else ("\\", 1)
        return Want.MORE if edge is Edge.OPEN else ("\\", 1)
    if c == "&":
        if reference := _REFERENCE.match(w, j):
            decoded = _decode_reference(reference.group())
            if decoded is not None:
                return decoded, reference.end() - j
        elif edge is Edge.OPEN and _REFERENCE_PREFIX.fullmatch(w, j):
            return Want.MORE
    return c, 1


def decode(markdown: str) -> str:
    """Markdown text (or a link destination) with its backslash escapes and character
    references decoded, as CommonMark reads it (as `decode_at` does, one after the other)."""
    return _ESCAPE_OR_REFERENCE.sub(_decoded, markdown)


def _decoded(match: re.Match[str]) -> str:
    escaped, reference = match.groups()
    if escaped is not None:
        return escaped
    decoded = _decode_reference(reference)
    return match.group() if decoded is None else decoded


class BareUrl(NamedTuple):
    """`bare_url`'s answer: the input characters it covers, and the text they become."""

    used: int
    text: str
    defused: bool  # a word joiner breaks the URL: its host is not allowed


def bare_url(tail: str, w: str, hosts: LinkHosts, edge: Edge) -> BareUrl | Want:
    """At `w[0]`, a character that is (or, escaped or as a character reference, stands for)
    maybe the first `/` of `http://`, `https://` or the `.` of `www.`, with `tail` the decoded
    text before it: does a URL that GFM would make a link of start here, and is its host in
    `hosts`? Judged the way remark-gfm finds them -- in decoded text (an escape or a reference
    does not stop it), in any case, whatever comes before, the host running on to `/`, `?`, `#`
    or a blank. Not allowed: a word joiner goes before `w[0]`, so no link forms. Allowed but
    followed by more than the trailing punctuation GFM leaves out (`https://ok.com)中文`,
    `https://ok.com@x`, which GFM would read into the host): a `/` closes the host (the same
    URL). Undecided when the window is full: not allowed (the safe side)."""
    first = decode_at(w, 0, edge)
    if first is Want.MORE:
        return first
    assert first is not None  # the window holds `w[0]`
    char, used = first
    keep, defused = BareUrl(used, w[:used], False), BareUrl(used, WORD_JOINER + w[:used], True)
    opening = tail[-6:].lower()
    if char == "/" and opening.endswith(("http:", "https:")):
        second = decode_at(w, used, edge)
        if second is Want.MORE:
            return second
        if second is None:
            return defused if edge is Edge.FULL else keep
        if second[0] != "/":
            return keep
        host = _bare_host(w, used + second[1], "", hosts, edge)
    elif char == "." and opening.endswith("www"):  # `www\\.`, `www&period;`: no host written out
        host = _bare_host(w, 0, "www", hosts, edge) if w[0] == "." else False
    else:
        return keep
    if host is Want.MORE:
        return host
    if isinstance(host, bool):
        return keep if host else defused
    return BareUrl(host, w[:host] + "/", False)


def _bare_host(
    w: str, j: int, authority: str, hosts: LinkHosts, edge: Edge
) -> bool | int | Literal[Want.MORE]:
    """Whether the host of a bare URL, its authority starting at `w[j]` after `authority`
    (already read), is allowed; an index: allowed, once a `/` follows `w[:index]`. The host
    must be written out: GFM takes the URL of a link it finds while parsing from the text as
    written (`https://ok.com&sol;@evil.com` leads to evil.com), the one it finds afterwards from
    the decoded text, so an escape or a reference ends the host as other characters do."""
    port = False
    while j < len(w):
        c = w[j]
        if c in _AUTHORITY_ENDS or c in _RUN_ENDS:
            return _bare_authority_allowed(authority, hosts)
        if c not in (_DIGITS if port else _HOST_CHARS):
            trailing = _trailing_only(w, j, edge)  # GFM leaves trailing punctuation out
            if trailing is Want.MORE:
                return trailing
            if trailing:
                return _bare_authority_allowed(authority, hosts)
            return j if _bare_authority_allowed(authority, hosts) else False
        port = port or c == ":"
        authority += c
        j += 1
    if edge is Edge.OPEN:
        return Want.MORE
    return edge is Edge.END and _bare_authority_allowed(authority, hosts)


def _trailing_only(w: str, j: int, edge: Edge) -> bool | Literal[Want.MORE]:
    """Whether only trailing punctuation follows from `w[j]` to the end of the autolink."""
    while j < len(w):
        if w[j] in _RUN_ENDS:
            return True
        if w[j] not in _TRAIL:
            return False
        j += 1
    return Want.MORE if edge is Edge.OPEN else edge is Edge.END


def _bare_authority_allowed(authority: str, hosts: LinkHosts) -> bool:
    match = _BARE_AUTHORITY.fullmatch(authority)
    host = match.group(1).lower() if match else ""
    return (host[:-1] if host.endswith(".") else host) in hosts


def autolink(w: str) -> str | Want:
    """The scheme of the autolink `<scheme:rest>` opening `w`, as CommonMark reads it."""
    url = autolink_url(w)
    return url.partition(":")[0] if isinstance(url, str) else url


def autolink_url(w: str) -> str | Want:
    """The destination of the autolink `<scheme:rest>` opening `w`, as CommonMark reads it
    (literally: no escapes or references inside)."""
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
    return w[1 : end.start()] if w[end.start()] == ">" else Want.NO


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
    """Markdown with every bracket, parenthesis, `!`, `<`, `>` and backtick escaped, and a `&`
    that what follows could complete into a character reference too: it renders as text and
    pairs with nothing around it."""
    text = _INERT.sub(lambda m: m.group() if len(m.group()) == 2 else "\\" + m.group(), markdown)
    if reference := OPEN_REFERENCE.search(text):
        amp = reference.start()
        backslashes = amp - len(text[:amp].rstrip("\\"))
        if backslashes % 2 == 0:
            text = text[:amp] + "\\" + text[amp:]
    return text
