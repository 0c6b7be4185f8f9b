"""Security headers for every chat_ui response, and a Content-Security-Policy that keeps the page
from talking to any host but its own.

The CSP is the browser's half of answer sanitizing (`backend/chat/markdown.py` is the server's):
even Markdown that slipped through could not load an image from another host or run a script.
Chainlit's page needs two small inline scripts; they are allowed by their hashes, computed from
the page as served, so script-src never needs 'unsafe-inline'. Chainlit's page also links Google
Fonts and a KaTeX stylesheet on jsDelivr: those links are removed (the UI falls back to local
fonts; LaTeX is off), so the browser does not even try to reach those hosts.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = {
    "default-src": "'self'",  # anything not named below: this origin only
    "script-src": "'self'",  # plus the hashes of the page's own inline scripts, never inline code
    "style-src": "'self' 'unsafe-inline'",  # React and Radix set style attributes
    "img-src": "'self' data: blob:",  # no image from another host, whatever an answer says
    "font-src": "'self' data:",
    "connect-src": "'self'",  # fetches and the websocket (same-origin ws/wss is 'self')
    "object-src": "'none'",
    "base-uri": "'self'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",  # no framing (clickjacking)
}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
_FOREIGN_LINK = re.compile(rb"<link\b[^>]*\bhref=[\"']?(?:https?:)?//[^>]*>\s*", re.IGNORECASE)
_INLINE_SCRIPT = re.compile(rb"<script\b(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script\s*>", re.I | re.S)


def content_security_policy(*, script_hashes: tuple[str, ...] = ()) -> str:
    """The CSP header value; `script_hashes` ('sha256-...') join script-src."""
    directives = dict(CSP)
    directives["script-src"] = " ".join([CSP["script-src"], *(f"'{h}'" for h in script_hashes)])
    return "; ".join(f"{name} {value}" for name, value in directives.items())


def harden_page(page: bytes) -> tuple[bytes, tuple[str, ...]]:
    """Chainlit's HTML page without `<link>`s to other hosts (Google Fonts, the KaTeX stylesheet on
    jsDelivr, their preconnects: the CSP would refuse them, but the browser would still try, and a
    preconnect reaches the host anyway), and the hashes of its inline scripts (one defines
    `global`, one Chainlit's transports), so script-src allows exactly those."""
    page = _FOREIGN_LINK.sub(b"", page)
    hashes = tuple(
        "sha256-" + base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()
        for m in _INLINE_SCRIPT.finditer(page)
    )
    return page, hashes


class SecurityHeaders:
    """ASGI middleware: `SECURITY_HEADERS` and the CSP on every HTTP response (a header the app set
    itself is kept). HTML responses are read whole (gzip undone) and passed through
    `harden_page`; websockets pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        start: Message | None = None  # an HTML response's start, held until its body is read
        body: list[bytes] = []

        async def send_secured(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                html = headers.get("content-type", "").startswith("text/html")
                if html and headers.get("content-encoding", "identity") in ("identity", "gzip"):
                    start = message
                    return
                _secure(headers, content_security_policy())
            elif message["type"] == "http.response.body" and start is not None:
                body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                headers = MutableHeaders(scope=start)
                page = b"".join(body)
                if "content-encoding" in headers:
                    del headers["content-encoding"]
                    page = gzip.decompress(page) if page else page
                page, hashes = harden_page(page)
                headers["content-length"] = str(len(page))
                _secure(headers, content_security_policy(script_hashes=hashes))
                await send(start)
                message = {"type": "http.response.body", "body": page, "more_body": False}
            await send(message)

        await self._app(scope, receive, send_secured)


def _secure(headers: MutableHeaders, csp: str) -> None:
    for name, value in {**SECURITY_HEADERS, "Content-Security-Policy": csp}.items():
        headers.setdefault(name, value)
