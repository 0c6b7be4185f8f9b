"""UserStore against a migrated PostgreSQL database, and the scrypt hash format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from backend.auth import (
    Role,
    UserStore,
    hash_password,
    highest_role,
    is_usable,
    unusable_password_hash,
    verify_password,
)
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


async def test_provision_creates_user_with_role(users: UserStore) -> None:
    created = await users.provision("alice", role=Role.KB_ADMIN, sync_role=False)
    assert await users.get("alice") == created and created.role is Role.KB_ADMIN


@pytest.mark.parametrize("password", ["", "!", PASSWORD])
async def test_provisioned_user_cannot_log_in_with_password(
    users: UserStore, password: str
) -> None:
    await users.provision("alice", role=Role.USER, sync_role=False)
    with pytest.raises(AuthError):
        await users.authenticate("alice", password)


async def test_provision_keeps_role_without_sync(users: UserStore) -> None:
    await users.provision("alice", role=Role.ADMIN, sync_role=False)
    again = await users.provision("alice", role=Role.USER, sync_role=False)
    assert again.role is Role.ADMIN


async def test_provision_syncs_role(users: UserStore) -> None:
    first = await users.provision("alice", role=Role.ADMIN, sync_role=True)
    again = await users.provision("alice", role=Role.USER, sync_role=True)
    assert (again.id, again.role) == (first.id, Role.USER)
    assert (await users.get("alice")) == again


async def test_provision_strips_identifier(users: UserStore) -> None:
    assert (await users.provision(" alice ", role=Role.USER, sync_role=False)).identifier == "alice"


async def test_provision_refuses_password_account(users: UserStore) -> None:
    await users.create("admin", PASSWORD, role=Role.ADMIN)
    with pytest.raises(AuthError):
        await users.provision("admin", role=Role.USER, sync_role=True)


async def test_refused_provision_leaves_password_account(users: UserStore) -> None:
    await users.create("alice", PASSWORD, role=Role.KB_ADMIN)
    with pytest.raises(AuthError):
        await users.provision("alice", role=Role.ADMIN, sync_role=True)
    assert (await users.authenticate("alice", PASSWORD)).role is Role.KB_ADMIN


async def test_provision_refuses_empty_identifier(users: UserStore) -> None:
    with pytest.raises(AuthError):
        await users.provision("  ", role=Role.USER, sync_role=False)


async def test_password_user_cannot_be_created_over_provisioned(users: UserStore) -> None:
    await users.provision("alice", role=Role.USER, sync_role=False)
    with pytest.raises(UserExists):
        await users.create("alice", PASSWORD)


def test_highest_role() -> None:
    assert highest_role([Role.KB_ADMIN, Role.ADMIN, Role.USER]) is Role.ADMIN


def test_highest_of_no_roles_is_user() -> None:
    assert highest_role([]) is Role.USER


def test_unusable_hashes_differ() -> None:
    assert unusable_password_hash() != unusable_password_hash()


def test_unusable_hash_is_not_usable() -> None:
    assert not is_usable(unusable_password_hash()) and is_usable(hash_password(PASSWORD))


def test_unusable_hash_verifies_nothing() -> None:
    stored = unusable_password_hash()
    assert not verify_password(stored, stored) and not verify_password("", stored)


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
