"""UserStore against a migrated PostgreSQL database, and the scrypt hash format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from backend.auth import Role, UserStore, hash_password, verify_password
from backend.db import migrate, open_pool
from backend.errors import AuthError, UserExists

PASSWORD = "correct horse"


@pytest.fixture
async def users(database: str) -> AsyncIterator[UserStore]:
    await migrate(database)
    pool = await open_pool(database, min_size=1, max_size=2)
    try:
        yield UserStore(pool)
    finally:
        await pool.close()


async def test_authenticate_returns_created_user(users: UserStore) -> None:
    created = await users.create("alice", PASSWORD, role=Role.KB_ADMIN)
    assert await users.authenticate("alice", PASSWORD) == created


async def test_identifier_is_stripped(users: UserStore) -> None:
    await users.create("  alice ", PASSWORD)
    assert (await users.authenticate("alice", PASSWORD)).identifier == "alice"


async def test_wrong_password_raises(users: UserStore) -> None:
    await users.create("alice", PASSWORD)
    with pytest.raises(AuthError):
        await users.authenticate("alice", "wrong password")


async def test_unknown_user_raises(users: UserStore) -> None:
    with pytest.raises(AuthError):
        await users.authenticate("nobody", PASSWORD)


async def test_duplicate_raises_user_exists(users: UserStore) -> None:
    await users.create("alice", PASSWORD)
    with pytest.raises(UserExists):
        await users.create("alice", "another password")


async def test_short_password_refused(users: UserStore) -> None:
    with pytest.raises(AuthError):
        await users.create("alice", "short")


async def test_refused_user_is_not_stored(users: UserStore) -> None:
    with pytest.raises(AuthError):
        await users.create("alice", "short")
    assert await users.get("alice") is None


async def test_ensure_keeps_existing_password(users: UserStore) -> None:
    await users.create("admin", PASSWORD, role=Role.ADMIN)
    await users.ensure("admin", "a different password", role=Role.ADMIN)
    assert (await users.authenticate("admin", PASSWORD)).identifier == "admin"


async def test_ensure_keeps_existing_role(users: UserStore) -> None:
    await users.create("alice", PASSWORD, role=Role.USER)
    assert (await users.ensure("alice", PASSWORD, role=Role.ADMIN)).role is Role.USER


async def test_ensure_creates_missing_user(users: UserStore) -> None:
    await users.ensure("admin", PASSWORD, role=Role.ADMIN)
    assert (await users.authenticate("admin", PASSWORD)).role is Role.ADMIN


def test_hash_format() -> None:
    fields = hash_password(PASSWORD).split("$")
    assert fields[:4] == ["scrypt", "16384", "8", "1"]
    assert len(fields) == 6


def test_hashes_are_salted() -> None:
    assert hash_password(PASSWORD) != hash_password(PASSWORD)


def test_verify_accepts_right_password() -> None:
    assert verify_password(PASSWORD, hash_password(PASSWORD))


def test_verify_rejects_wrong_password() -> None:
    assert not verify_password("wrong password", hash_password(PASSWORD))


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "garbage",
        "bcrypt$16384$8$1$c2FsdA==$ZGlnZXN0",
        "scrypt$x$8$1$c2FsdA==$ZGlnZXN0",
        "scrypt$16384$8$1$!!!$ZGlnZXN0",
        "scrypt$16384$8$1$c2FsdA==$",
        "scrypt$3$8$1$c2FsdA==$ZGlnZXN0",
        "scrypt$16384$8$1$c2FsdA==$ZGlnZXN0$extra",
    ],
)
def test_verify_rejects_garbage(stored: str) -> None:
    assert not verify_password(PASSWORD, stored)
