"""Users, roles and password login.

Passwords are hashed with scrypt (n=2**14, r=8, p=1, 16-byte salt), stored as
`scrypt$n$r$p$salt_b64$hash_b64`; verification is constant-time. Users live in PostgreSQL.
Single sign-on accounts (`UserStore.provision`) store `!` + random text instead: no password
verifies against it, so they cannot log in with a password.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from backend.errors import AuthError, UserExists


class Role(enum.StrEnum):
    USER = "user"
    KB_ADMIN = "kb_admin"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Higher grants more: user < kb_admin < admin."""
        return _RANKS[self]


_RANKS = {Role.USER: 0, Role.KB_ADMIN: 1, Role.ADMIN: 2}


def highest_role(roles: Iterable[Role]) -> Role:
    """The role granting the most among `roles`; `user` when there is none."""
    return max(roles, key=lambda role: role.rank, default=Role.USER)


@dataclass(frozen=True)
class User:
    id: str
    identifier: str
    role: Role


@dataclass(frozen=True)
class Principal:
    """Who is asking, as the server knows it (role looked up server-side, never taken from a client)."""

    user: str  # the user's identifier (login name)
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def may_manage_documents(self) -> bool:
        """kb_admin and admin may create knowledge bases and upload; grants narrow kb_admin."""
        return self.role in (Role.KB_ADMIN, Role.ADMIN)


_N, _R, _P = 2**14, 8, 1
UNUSABLE_PREFIX = "!"  # marks a password hash no password matches (single sign-on accounts)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest, expected)


def unusable_password_hash() -> str:
    """A stored value no password verifies against (random, so no two accounts share it)."""
    return UNUSABLE_PREFIX + secrets.token_urlsafe(24)


def is_usable(stored: str) -> bool:
    """False for a single sign-on account's password hash."""
    return not stored.startswith(UNUSABLE_PREFIX)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so a miss costs what a wrong password does."""
    return hash_password(secrets.token_hex(8))


class UserStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def create(self, identifier: str, password: str, *, role: Role = Role.USER) -> User:
        """Raises UserExists. The identifier is stored stripped; the password must be 8+ chars."""
        identifier = identifier.strip()
        if not identifier or len(password) < 8:
            raise AuthError("identifier must be non-empty and password at least 8 characters")
        hashed = await asyncio.to_thread(hash_password, password)
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "INSERT INTO users (identifier, password_hash, role) VALUES (%s, %s, %s)"
                    " RETURNING id",
                    (identifier, hashed, role.value),
                )
                row = await cur.fetchone()
        except UniqueViolation as exc:
            raise UserExists(f"user {identifier!r} already exists") from exc
        assert row is not None
        return User(id=str(row[0]), identifier=identifier, role=role)

    async def ensure(self, identifier: str, password: str, *, role: Role) -> User:
        """Create the user unless it exists; an existing user keeps its password and role."""
        existing = await self.get(identifier)
        if existing is not None:
            return existing
        try:
            return await self.create(identifier, password, role=role)
        except UserExists:
            found = await self.get(identifier)
            assert found is not None
            return found

    async def get(self, identifier: str) -> User | None:
        async with self._pool.connection() as conn:
            cur = await conn.cursor(row_factory=dict_row).execute(
                "SELECT id, identifier, role FROM users WHERE identifier = %s", (identifier,)
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return User(id=str(row["id"]), identifier=row["identifier"], role=Role(row["role"]))

    async def authenticate(self, identifier: str, password: str) -> User:
        """The user, or AuthError for an unknown user or wrong password (same message, same cost)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, identifier, role, password_hash FROM users WHERE identifier = %s",
                (identifier.strip(),),
            )
            row = await cur.fetchone()
        usable = row is not None and is_usable(row[3])
        stored = row[3] if row is not None and usable else _dummy_hash()
        ok = await asyncio.to_thread(verify_password, password, stored)
        if row is None or not usable or not ok:
            raise AuthError("bad credentials")
        return User(id=str(row[0]), identifier=row[1], role=Role(row[2]))

    async def provision(self, identifier: str, *, role: Role, sync_role: bool) -> User:
        """The single sign-on account `identifier`, created on first login with `role` and an
        unusable password; with `sync_role` an existing account's role becomes `role`.

        Raises AuthError for an empty identifier, or one naming a password account: an identity
        provider never takes over a local login. One statement, so concurrent first logins agree.
        """
        identifier = identifier.strip()
        if not identifier:
            raise AuthError("empty single sign-on identifier")
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO users (identifier, password_hash, role) VALUES (%s, %s, %s)"
                " ON CONFLICT (identifier) DO UPDATE"
                " SET role = CASE WHEN %s THEN EXCLUDED.role ELSE users.role END"
                " WHERE starts_with(users.password_hash, %s)"
                " RETURNING id, role",
                (identifier, unusable_password_hash(), role.value, sync_role, UNUSABLE_PREFIX),
            )
            row = await cur.fetchone()
        if row is None:
            raise AuthError(f"{identifier!r} is a password account; single sign-on refused")
        return User(id=str(row[0]), identifier=identifier, role=Role(row[1]))
