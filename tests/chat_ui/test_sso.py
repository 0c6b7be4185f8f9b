"""Single sign-on without a browser: what a proxy's headers and an OIDC provider's userinfo map to,
and what export_chainlit_env hands Chainlit and chat_ui/app.py for it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.datastructures import Headers

from backend.auth import Role
from backend.config import (
    HEADER_LOGIN_ENV,
    AuthSettings,
    ChainlitLogin,
    Settings,
    export_chainlit_env,
    exported_login,
)

with warnings.catch_warnings():
    # Importing chainlit imports traceloop, whose pydantic models use the deprecated class Config.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"traceloop\.")
    from chat_ui.sso import Identity, header_identity, oidc_identity

PROXY = "10.0.0.5"
HEADER = {
    "header_user": "X-Forwarded-User",
    "header_role": "X-Forwarded-Groups",
    "header_role_map": {"qwen-admins": "admin", "kb-editors": "kb_admin"},
    "trusted_proxies": [PROXY, "192.168.0.0/16"],
}
OIDC = {
    "oidc_client_id": "qwen-chat",
    "oidc_client_secret": "client-secret",
    "oidc_issuer": "https://kc.example.com/realms/corp",
}
ROLE_CLAIM = {
    "oidc_role_claim": "realm_access.roles",
    "oidc_role_map": {"qwen-admin": "admin", "qwen-kb": "kb_admin"},
}


def _auth(*groups: dict[str, Any], **fields: Any) -> AuthSettings:
    merged: dict[str, Any] = {}
    for group in groups:
        merged.update(group)
    return AuthSettings.model_validate({**merged, **fields})


HEADER_AUTH = _auth(HEADER)
OIDC_AUTH = _auth(OIDC, ROLE_CLAIM)
CHAINLIT_ENV = (
    "CHAINLIT_APP_ROOT", "CHAINLIT_AUTH_SECRET", "CHAINLIT_URL", HEADER_LOGIN_ENV,
    "OAUTH_GENERIC_NAME", "OAUTH_GENERIC_CLIENT_ID", "OAUTH_GENERIC_CLIENT_SECRET",
    "OAUTH_GENERIC_AUTH_URL", "OAUTH_GENERIC_TOKEN_URL", "OAUTH_GENERIC_USER_INFO_URL",
    "OAUTH_GENERIC_SCOPES", "OAUTH_GENERIC_USER_IDENTIFIER", "OAUTH_GITHUB_CLIENT_ID",
)  # fmt: skip


def _headers(*pairs: tuple[str, str]) -> Headers:
    return Headers(raw=[(k.lower().encode(), v.encode()) for k, v in pairs])


def _from_proxy(*pairs: tuple[str, str], ip: str | None = PROXY) -> Identity | None:
    return header_identity(_headers(*pairs), client_ip=ip, auth=HEADER_AUTH)


# header login ------------------------------------------------------------------------------------


def test_header_names_user() -> None:
    identity = _from_proxy(("X-Forwarded-User", "alice"))
    assert identity == Identity(identifier="alice", role=Role.USER, sync_role=True)


def test_header_highest_mapped_group_wins() -> None:
    identity = _from_proxy(
        ("X-Forwarded-User", "a"), ("X-Forwarded-Groups", "kb-editors, qwen-admins")
    )
    assert identity is not None and identity.role is Role.ADMIN


def test_header_unmapped_groups_give_user() -> None:
    identity = _from_proxy(("X-Forwarded-User", "a"), ("X-Forwarded-Groups", "staff,admins"))
    assert identity is not None and identity.role is Role.USER


def test_header_without_role_header_keeps_stored_role() -> None:
    auth = _auth(HEADER, header_role="")
    identity = header_identity(
        _headers(("X-Forwarded-User", "a"), ("X-Forwarded-Groups", "qwen-admins")),
        client_ip=PROXY, auth=auth,
    )  # fmt: skip
    assert identity == Identity(identifier="a", role=Role.USER, sync_role=False)


def test_header_name_in_utf8() -> None:
    identity = _from_proxy(("X-Forwarded-User", "张三"))
    assert identity is not None and identity.identifier == "张三"


def test_header_from_trusted_network() -> None:
    assert _from_proxy(("X-Forwarded-User", "a"), ip="192.168.3.4") is not None


def test_header_from_ipv4_mapped_proxy_address() -> None:
    assert _from_proxy(("X-Forwarded-User", "a"), ip="::ffff:10.0.0.5") is not None


@pytest.mark.parametrize("ip", ["10.0.0.6", "127.0.0.1", "::1", "not-an-ip", None])
def test_header_from_untrusted_client_refused(ip: str | None) -> None:
    assert _from_proxy(("X-Forwarded-User", "alice"), ip=ip) is None


def test_header_missing_refused() -> None:
    assert _from_proxy(("X-Other", "alice")) is None


@pytest.mark.parametrize("name", ["", "   ", "a\tb", "x" * 256])
def test_header_bad_name_refused(name: str) -> None:
    assert _from_proxy(("X-Forwarded-User", name)) is None


def test_header_user_sent_twice_refused() -> None:
    assert _from_proxy(("X-Forwarded-User", "alice"), ("X-Forwarded-User", "admin")) is None


def test_header_groups_sent_twice_refused() -> None:
    identity = _from_proxy(
        ("X-Forwarded-User", "a"), ("X-Forwarded-Groups", "staff"),
        ("X-Forwarded-Groups", "qwen-admins"),
    )  # fmt: skip
    assert identity is None


def test_header_login_off_refuses() -> None:
    identity = header_identity(
        _headers(("X-Forwarded-User", "alice")), client_ip=PROXY, auth=AuthSettings()
    )
    assert identity is None


# OIDC --------------------------------------------------------------------------------------------


def _userinfo(**claims: Any) -> dict[str, Any]:
    return {"sub": "f3c1", "preferred_username": "alice", "email": "a@example.com", **claims}


def test_oidc_names_user_by_claim() -> None:
    identity = oidc_identity("SSO", _userinfo(), auth=_auth(OIDC))
    assert identity == Identity(identifier="alice", role=Role.USER, sync_role=False)


def test_oidc_nested_role_claim() -> None:
    data = _userinfo(realm_access={"roles": ["offline_access", "qwen-kb", "qwen-admin"]})
    identity = oidc_identity("SSO", data, auth=OIDC_AUTH)
    assert identity == Identity(identifier="alice", role=Role.ADMIN, sync_role=True)


def test_oidc_string_role_claim() -> None:
    auth = _auth(OIDC, ROLE_CLAIM, oidc_role_claim="group")
    identity = oidc_identity("SSO", _userinfo(group="qwen-kb"), auth=auth)
    assert identity is not None and identity.role is Role.KB_ADMIN


def test_oidc_missing_role_claim_gives_user() -> None:
    identity = oidc_identity("SSO", _userinfo(), auth=OIDC_AUTH)
    assert identity == Identity(identifier="alice", role=Role.USER, sync_role=True)


def test_oidc_other_user_claim() -> None:
    auth = _auth(OIDC, oidc_user_claim="email")
    identity = oidc_identity("SSO", _userinfo(), auth=auth)
    assert identity is not None and identity.identifier == "a@example.com"


@pytest.mark.parametrize("name", [None, "", 42, ["alice"], "a\nb"])
def test_oidc_bad_user_claim_refused(name: object) -> None:
    assert oidc_identity("SSO", _userinfo(preferred_username=name), auth=OIDC_AUTH) is None


def test_oidc_other_provider_refused() -> None:
    assert oidc_identity("github", _userinfo(), auth=OIDC_AUTH) is None


def test_oidc_off_refuses() -> None:
    assert oidc_identity("SSO", _userinfo(), auth=AuthSettings()) is None


# settings and what export_chainlit_env hands Chainlit -----------------------------------------------


def test_header_login_needs_trusted_proxies() -> None:
    with pytest.raises(ValidationError, match="QWEN_AUTH__TRUSTED_PROXIES"):
        AuthSettings(header_user="X-Forwarded-User")


def test_oidc_needs_secret() -> None:
    with pytest.raises(ValidationError, match="QWEN_AUTH__OIDC_CLIENT_SECRET"):
        _auth(OIDC, oidc_client_secret=None)


def test_oidc_needs_endpoints() -> None:
    with pytest.raises(ValidationError, match="QWEN_AUTH__OIDC_ISSUER"):
        _auth(OIDC, oidc_issuer="")


@pytest.mark.parametrize("name", ["keycloak", "github", "a b", "", "x" * 33])
def test_oidc_name_must_be_free(name: str) -> None:
    with pytest.raises(ValidationError, match="QWEN_AUTH__OIDC_NAME"):
        AuthSettings(oidc_name=name)


def test_issuer_gives_keycloak_endpoints() -> None:
    endpoints = _auth(OIDC).oidc_endpoints
    base = "https://kc.example.com/realms/corp/protocol/openid-connect"
    assert (endpoints.auth, endpoints.token, endpoints.userinfo) == (
        base + "/auth", base + "/token", base + "/userinfo",
    )  # fmt: skip


def test_explicit_endpoint_wins_over_issuer() -> None:
    auth = _auth(OIDC, oidc_token_url="https://idp/token")
    assert auth.oidc_endpoints.token == "https://idp/token"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """monkeypatch without outer QWEN_ settings; the variables export writes are restored after."""
    for name in list(os.environ):
        if name.startswith("QWEN_") and not name.startswith("QWEN_TEST_"):
            monkeypatch.delenv(name)
    for name in CHAINLIT_ENV:
        monkeypatch.setenv(name, "before")
    return monkeypatch


def test_settings_from_env(env: pytest.MonkeyPatch) -> None:
    env.setenv("QWEN_AUTH__HEADER_USER", "X-Forwarded-User")
    env.setenv("QWEN_AUTH__TRUSTED_PROXIES", '["10.0.0.5", "fd00::/8"]')
    env.setenv("QWEN_AUTH__HEADER_ROLE_MAP", '{"qwen-admins": "admin"}')
    auth = Settings().auth
    assert [str(n) for n in auth.trusted_proxies] == ["10.0.0.5/32", "fd00::/8"]
    assert auth.header_role_map == {"qwen-admins": Role.ADMIN}


def test_export_oidc(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    auth = _auth(OIDC, public_url="https://chat.example.com")
    export_chainlit_env(Settings(auth=auth), app_root=tmp_path)
    base = "https://kc.example.com/realms/corp/protocol/openid-connect"
    assert {name: os.environ.get(name) for name in CHAINLIT_ENV[2:]} == {
        "CHAINLIT_URL": "https://chat.example.com",
        HEADER_LOGIN_ENV: None,
        "OAUTH_GENERIC_NAME": "SSO",
        "OAUTH_GENERIC_CLIENT_ID": "qwen-chat",
        "OAUTH_GENERIC_CLIENT_SECRET": "client-secret",
        "OAUTH_GENERIC_AUTH_URL": base + "/auth",
        "OAUTH_GENERIC_TOKEN_URL": base + "/token",
        "OAUTH_GENERIC_USER_INFO_URL": base + "/userinfo",
        "OAUTH_GENERIC_SCOPES": "openid profile email",
        "OAUTH_GENERIC_USER_IDENTIFIER": "preferred_username",
        "OAUTH_GITHUB_CLIENT_ID": None,
    }


def test_export_without_sso_leaves_no_oauth(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    export_chainlit_env(Settings(), app_root=tmp_path)
    left = [name for name in os.environ if name.startswith("OAUTH_")]
    assert (left, os.environ.get("CHAINLIT_URL")) == ([], None)


def test_exported_login_after_default_export(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    export_chainlit_env(Settings(), app_root=tmp_path)
    assert exported_login() == ChainlitLogin(header=False, oidc_provider=None)


def test_exported_login_with_both(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    auth = _auth(HEADER, OIDC, oidc_name="corp-sso")
    export_chainlit_env(Settings(auth=auth), app_root=tmp_path)
    assert exported_login() == ChainlitLogin(header=True, oidc_provider="corp-sso")
