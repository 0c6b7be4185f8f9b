"""Single sign-on: who a trusted SSO proxy's headers or an OIDC provider's userinfo say the user is.

chat_ui/app.py's Chainlit callbacks hand the request's facts to `header_identity` or
`oidc_identity` and sign the resulting `Identity` in with `UserStore.provision` (the account is
created on first login, with no usable password). A source that carries roles (a role header, a
role claim) sets the account's role on every login; otherwise a new account is `user` and an
existing one keeps its role.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from chainlit import oauth_providers
from pydantic import IPvAnyNetwork
from starlette.datastructures import Headers

from backend.auth import Role, highest_role
from backend.config import AuthSettings

logger = logging.getLogger(__name__)

MAX_IDENTIFIER_CHARS = 255


@dataclass(frozen=True)
class Identity:
    identifier: str
    role: Role
    sync_role: bool  # the source speaks for the role: set it on every login


def header_identity(
    headers: Headers, *, client_ip: str | None, auth: AuthSettings
) -> Identity | None:
    """The user an SSO proxy names in `auth.header_user`, or None (refused).

    Refused unless header login is on, the client address is in `auth.trusted_proxies` (the proxy
    must be the only way to set these headers), and the user header is present exactly once with
    a printable name. A role header present more than once is refused too (a proxy that appends
    rather than replaces would pass a client's own value along).
    """
    if not auth.header_login:
        return None
    if not _trusted(client_ip, auth.trusted_proxies):
        logger.warning("header login refused: client %s is not a trusted proxy", client_ip)
        return None
    names = headers.getlist(auth.header_user)
    identifier = _identifier(_utf8(names[0])) if len(names) == 1 else None
    if identifier is None:
        logger.warning("header login refused: no single valid %s header", auth.header_user)
        return None
    if not auth.header_role:
        return Identity(identifier=identifier, role=Role.USER, sync_role=False)
    values = headers.getlist(auth.header_role)
    if len(values) > 1:
        logger.warning("header login refused: %s sent more than once", auth.header_role)
        return None
    groups = [group.strip() for value in values for group in _utf8(value).split(",")]
    return Identity(
        identifier=identifier, role=_mapped(groups, auth.header_role_map), sync_role=True
    )


def oidc_identity(
    provider_id: str, raw_user_data: Mapping[str, object], *, auth: AuthSettings
) -> Identity | None:
    """The user an OIDC provider's userinfo names in `auth.oidc_user_claim`, or None (refused).

    Refused for any provider but ours (`auth.oidc_name`) and for a missing or unprintable name.
    With `auth.oidc_role_claim` (dotted path; a string or a list of strings) the role is the
    highest one `auth.oidc_role_map` gives its values, `user` if none.
    """
    if not auth.oidc_login or provider_id != auth.oidc_name:
        logger.warning("OIDC login refused: unknown provider %r", provider_id)
        return None
    claim = raw_user_data.get(auth.oidc_user_claim)
    identifier = _identifier(claim) if isinstance(claim, str) else None
    if identifier is None:
        logger.warning("OIDC login refused: no usable %r claim", auth.oidc_user_claim)
        return None
    if not auth.oidc_role_claim:
        return Identity(identifier=identifier, role=Role.USER, sync_role=False)
    values = _claim(raw_user_data, auth.oidc_role_claim)
    return Identity(identifier=identifier, role=_mapped(values, auth.oidc_role_map), sync_role=True)


def install_oidc_provider(*, name: str) -> None:
    """Rebuild Chainlit's generic OAuth provider from the environment as it is now, named `name`.

    Chainlit builds its providers when it is imported, which chat_ui.server does before
    export_chainlit_env sets `OAUTH_GENERIC_*`; the provider reads them again in its constructor.
    """
    provider = oauth_providers.GenericOAuthProvider()
    provider.id = name
    others = [
        p
        for p in oauth_providers.providers
        if not isinstance(p, oauth_providers.GenericOAuthProvider)
    ]
    oauth_providers.providers[:] = [*others, provider]


def _trusted(client_ip: str | None, proxies: Iterable[IPvAnyNetwork]) -> bool:
    if client_ip is None:
        return False
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in proxies)


def _utf8(value: str) -> str:
    """HTTP headers arrive decoded as Latin-1; a proxy sending UTF-8 (张三) gets it back."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _identifier(value: str) -> str | None:
    name = value.strip()
    if not name or len(name) > MAX_IDENTIFIER_CHARS or not name.isprintable():
        return None
    return name


def _claim(data: Mapping[str, object], path: str) -> list[str]:
    """The string values at a dotted claim path (`realm_access.roles`); [] when absent."""
    value: object = data
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return []
        value = value.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def _mapped(values: Iterable[str], role_map: Mapping[str, Role]) -> Role:
    return highest_role(role_map[value] for value in values if value in role_map)
