"""Security headers and the CSP through the middleware, on Chainlit's own page (gzipped, as
Chainlit serves it) and on a JSON route."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import HTMLResponse

from chat_ui.headers import SECURITY_HEADERS, SecurityHeaders, harden_page

spec = importlib.util.find_spec("chainlit")
assert spec is not None and spec.origin is not None
CHAINLIT_PAGE = (Path(spec.origin).parent / "frontend" / "dist" / "index.html").read_text()
INJECTED = '<script>\nundefined\nwindow.transports = ["websocket"];\n</script>'


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    page = CHAINLIT_PAGE.replace("<!-- JS INJECTION PLACEHOLDER -->", INJECTED)

    @app.get("/page")
    async def html() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/data")
    async def data() -> dict[str, str]:
        return {"status": "ok", "padding": "x" * 200}

    app.add_middleware(GZipMiddleware, minimum_size=100)
    app.add_middleware(SecurityHeaders)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ui") as client:
        yield client


def directives(csp: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (d.split() for d in csp.split(";"))}


def script_hashes(page: str) -> set[str]:
    bodies = re.findall(r"<script>(.*?)</script>", page, re.S)
    digests = (hashlib.sha256(body.encode()).digest() for body in bodies)
    return {f"'sha256-{base64.b64encode(d).decode()}'" for d in digests}


async def test_every_response_has_the_security_headers(client: httpx.AsyncClient) -> None:
    for path in ("/page", "/data", "/missing"):
        response = await client.get(path)
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value, (path, name)
        csp = directives(response.headers["Content-Security-Policy"])
        assert csp["default-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
        assert csp["img-src"] == ["'self'", "data:", "blob:"] and csp["object-src"] == ["'none'"]
        assert (
            "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
        )


async def test_page_allows_exactly_its_inline_scripts(client: httpx.AsyncClient) -> None:
    response = await client.get("/page", headers={"Accept-Encoding": "gzip"})
    page = response.text
    scripts = set(directives(response.headers["Content-Security-Policy"])["script-src"])
    assert scripts == {"'self'"} | script_hashes(page)
    assert len(script_hashes(page)) == 2  # `global`, and Chainlit's transports


async def test_page_links_no_other_host(client: httpx.AsyncClient) -> None:
    response = await client.get("/page", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in response.headers
    assert int(response.headers["content-length"]) == len(response.content)
    assert "googleapis" not in response.text and "jsdelivr" not in response.text
    assert re.search(r"""(?:href|src)=["']?(?:https?:)?//""", response.text) is None
    assert '<script type="module" crossorigin src="/assets/' in response.text  # the app still loads


async def test_other_content_stays_compressed(client: httpx.AsyncClient) -> None:
    response = await client.get("/data", headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert response.json()["status"] == "ok"


def test_hashes_follow_the_page() -> None:
    _, one = harden_page(b"<script>a()</script>")
    _, two = harden_page(b"<script>b()</script><script src='/x.js'></script>")
    assert one != two and len(two) == 1
