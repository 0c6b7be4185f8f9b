"""Single sign-on against a running chat_ui over HTTP: a trusted SSO proxy's headers, and a whole
OIDC login (authorize redirect, state cookie, code exchange with the client secret, userinfo)
through a Keycloak-shaped fake provider on loopback. Password login keeps working beside both.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI, Form, Header, HTTPException
from fastapi.responses import RedirectResponse
from playwright.async_api import Browser

from tests.e2e.conftest import PASSWORD, USER, RunningUI, _redis_db_url, _start_ui, _stop_ui

pytestmark = [pytest.mark.slow]

CLIENT_ID, CLIENT_SECRET = "qwen-chat", "idp-client-secret-0123456789"
REALM = "/realms/test"
UNTRUSTED = "127.0.0.2"  # another loopback address: reaches the UI, but is not the proxy
POLL_S = 0.01


@dataclass
class FakeIdp:
    """A Keycloak-layout OIDC provider: /auth logs in whoever `claims` describes, at once."""

    claims: dict[str, Any] = field(default_factory=dict)
    redirect_uris: list[str] = field(default_factory=list)  # as sent to /auth
    _codes: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    _tokens: dict[str, dict[str, Any]] = field(default_factory=dict)

    def app(self) -> FastAPI:
        app = FastAPI()
        endpoints = REALM + "/protocol/openid-connect"

        @app.get(endpoints + "/auth")
        async def authorize(
            client_id: str, redirect_uri: str, state: str, response_type: str, scope: str
        ) -> RedirectResponse:
            if client_id != CLIENT_ID or response_type != "code" or "openid" not in scope:
                raise HTTPException(400, "bad authorization request")
            self.redirect_uris.append(redirect_uri)
            code = secrets.token_urlsafe(12)
            self._codes[code] = (redirect_uri, dict(self.claims))
            query = urlencode({"code": code, "state": state})
            return RedirectResponse(f"{redirect_uri}?{query}", status_code=302)

        @app.post(endpoints + "/token")
        async def token(
            client_id: Annotated[str, Form()], client_secret: Annotated[str, Form()],
            code: Annotated[str, Form()], grant_type: Annotated[str, Form()],
            redirect_uri: Annotated[str, Form()],
        ) -> dict[str, str]:  # fmt: skip
            issued = self._codes.pop(code, None)
            if (client_id, client_secret, grant_type) != (
                CLIENT_ID, CLIENT_SECRET, "authorization_code",
            ) or issued is None or issued[0] != redirect_uri:  # fmt: skip
                raise HTTPException(400, "invalid_grant")
            access = secrets.token_urlsafe(16)
            self._tokens[access] = issued[1]
            return {"access_token": access, "token_type": "Bearer"}

        @app.get(endpoints + "/userinfo")
        async def userinfo(authorization: Annotated[str, Header()]) -> dict[str, Any]:
            claims = self._tokens.get(authorization.removeprefix("Bearer "))
            if claims is None:
                raise HTTPException(401, "invalid_token")
            return claims

        return app


@pytest.fixture(scope="module")
def idp() -> Iterator[tuple[FakeIdp, str]]:
    """The fake provider and its issuer URL, served from a background thread."""
    fake = FakeIdp()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(fake.app(), log_level="warning", lifespan="off", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started or not thread.is_alive():
            break
        time.sleep(POLL_S)
    if not server.started:
        pytest.fail("the fake OIDC provider did not start")
    yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}{REALM}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest_asyncio.fixture(scope="module")
async def sso_ui(
    idp: tuple[FakeIdp, str], fake_engine_url: str, database_url: str, redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningUI]:  # fmt: skip
    """chat_ui with password, header (proxy: 127.0.0.1) and OIDC login all on."""
    process, ui, name = await _start_ui(
        engine_url=fake_engine_url, database_url=database_url,
        redis_url=_redis_db_url(redis_url, 7), state=tmp_path_factory.mktemp("ui-sso"),
        extra_env={
            "FORWARDED_ALLOW_IPS": "127.0.0.1",  # uvicorn's default, stated: see the spoof test
            "QWEN_AUTH__HEADER_USER": "X-Forwarded-User",
            "QWEN_AUTH__HEADER_ROLE": "X-Forwarded-Groups",
            "QWEN_AUTH__HEADER_ROLE_MAP": '{"qwen-admins": "admin", "kb-editors": "kb_admin"}',
            "QWEN_AUTH__TRUSTED_PROXIES": '["127.0.0.1"]',
            "QWEN_AUTH__OIDC_CLIENT_ID": CLIENT_ID,
            "QWEN_AUTH__OIDC_CLIENT_SECRET": CLIENT_SECRET,
            "QWEN_AUTH__OIDC_ISSUER": idp[1],
            "QWEN_AUTH__OIDC_ROLE_CLAIM": "realm_access.roles",
            "QWEN_AUTH__OIDC_ROLE_MAP": '{"qwen-admin": "admin"}',
            "QWEN_SERVING__SENTIMENT": "false",
            "QWEN_SERVING__WARMUP": "false",
        },
    )  # fmt: skip
    yield ui
    _stop_ui(process, database_url, name)


def _client(ui: RunningUI, *, local_address: str | None = None) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=local_address) if local_address else None
    return httpx.AsyncClient(base_url=ui.chat.rstrip("/"), trust_env=False, transport=transport)


async def _header_login(
    ui: RunningUI, headers: dict[str, str], *, local_address: str | None = None
) -> tuple[int, dict[str, Any] | None]:
    """(status of POST /auth/header, the logged-in user as GET /user shows it, or None); header
    values are sent in UTF-8, as proxies send non-ASCII names."""
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    async with _client(ui, local_address=local_address) as client:
        response = await client.post("/auth/header", headers=raw)
        me = await client.get("/user")
    return response.status_code, me.json() if me.status_code == 200 else None


def _who(user: dict[str, Any] | None) -> tuple[str, str] | None:
    return None if user is None else (user["identifier"], user["metadata"]["role"])


async def test_login_page_offers_every_method(sso_ui: RunningUI) -> None:
    async with _client(sso_ui) as client:
        config = (await client.get("/auth/config")).json()
    assert (config["passwordAuth"], config["headerAuth"], config["oauthProviders"]) == (
        True, True, ["SSO"],
    )  # fmt: skip


async def test_password_login_still_works(sso_ui: RunningUI) -> None:
    async with _client(sso_ui) as client:
        response = await client.post("/login", data={"username": USER, "password": PASSWORD})
        me = (await client.get("/user")).json()
    assert (response.status_code, me["identifier"]) == (200, USER)


async def test_header_login_creates_user_with_mapped_role(sso_ui: RunningUI) -> None:
    status, me = await _header_login(
        sso_ui, {"X-Forwarded-User": "张三", "X-Forwarded-Groups": "staff,qwen-admins"}
    )
    assert (status, _who(me)) == (200, ("张三", "admin"))


async def test_header_login_resyncs_role(sso_ui: RunningUI) -> None:
    await _header_login(sso_ui, {"X-Forwarded-User": "carol", "X-Forwarded-Groups": "kb-editors"})
    status, me = await _header_login(sso_ui, {"X-Forwarded-User": "carol"})
    assert (status, _who(me)) == (200, ("carol", "user"))


async def test_header_user_cannot_log_in_with_password(sso_ui: RunningUI) -> None:
    await _header_login(sso_ui, {"X-Forwarded-User": "dave"})
    async with _client(sso_ui) as client:
        response = await client.post("/login", data={"username": "dave", "password": "!"})
    assert response.status_code == 401


async def test_header_login_refused_from_other_address(sso_ui: RunningUI) -> None:
    status, me = await _header_login(sso_ui, {"X-Forwarded-User": "erin"}, local_address=UNTRUSTED)
    assert (status, me) == (401, None)


async def test_forwarded_for_does_not_make_a_client_the_proxy(sso_ui: RunningUI) -> None:
    headers = {"X-Forwarded-User": "erin", "X-Forwarded-For": "127.0.0.1"}
    status, me = await _header_login(sso_ui, headers, local_address=UNTRUSTED)
    assert (status, me) == (401, None)


async def test_header_login_cannot_take_over_password_account(sso_ui: RunningUI) -> None:
    status, me = await _header_login(
        sso_ui, {"X-Forwarded-User": USER, "X-Forwarded-Groups": "qwen-admins"}
    )
    assert (status, me) == (401, None)


@pytest.mark.browser
async def test_login_page_signs_proxy_user_in(browser: Browser, sso_ui: RunningUI) -> None:
    context = await browser.new_context(extra_http_headers={"X-Forwarded-User": "ivan"})
    try:
        page = await context.new_page()
        await page.goto(sso_ui.chat)
        await page.wait_for_selector("#chat-input", timeout=30_000)  # no form filled in
        assert await page.locator("#password").count() == 0
    finally:
        await context.close()


async def _oidc_login(ui: RunningUI) -> tuple[httpx.URL, dict[str, Any] | None]:
    """Follow the whole redirect chain from the login button; (where it ends, GET /user)."""
    async with _client(ui) as client:
        response = await client.get("/auth/oauth/SSO", follow_redirects=True)
        me = await client.get("/user")
    return response.url, me.json() if me.status_code == 200 else None


async def test_oidc_login_creates_user_with_claimed_role(
    sso_ui: RunningUI, idp: tuple[FakeIdp, str]
) -> None:
    idp[0].claims = {
        "sub": "4f1c", "preferred_username": "frank",
        "realm_access": {"roles": ["offline_access", "qwen-admin"]},
    }  # fmt: skip
    ended, me = await _oidc_login(sso_ui)
    assert (ended.path, _who(me)) == ("/chat/login/callback", ("frank", "admin"))


async def test_oidc_redirect_uri_is_the_ui_callback(
    sso_ui: RunningUI, idp: tuple[FakeIdp, str]
) -> None:
    idp[0].claims = {"sub": "77aa", "preferred_username": "grace"}
    await _oidc_login(sso_ui)
    assert idp[0].redirect_uris[-1] == sso_ui.chat + "auth/oauth/SSO/callback"


async def test_oidc_login_resyncs_role(sso_ui: RunningUI, idp: tuple[FakeIdp, str]) -> None:
    idp[0].claims = {
        "sub": "9b",
        "preferred_username": "heidi",
        "realm_access": {"roles": ["qwen-admin"]},
    }
    await _oidc_login(sso_ui)
    idp[0].claims = {"sub": "9b", "preferred_username": "heidi", "realm_access": {"roles": []}}
    _, me = await _oidc_login(sso_ui)
    assert _who(me) == ("heidi", "user")


async def test_oidc_cannot_take_over_password_account(
    sso_ui: RunningUI, idp: tuple[FakeIdp, str]
) -> None:
    idp[0].claims = {"sub": "x1", "preferred_username": USER}
    ended, me = await _oidc_login(sso_ui)
    assert (ended.path, ended.params.get("error"), me) == ("/chat/login", "oauthSignin", None)
