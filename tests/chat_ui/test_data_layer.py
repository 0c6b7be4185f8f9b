"""PostgresDataLayer on a freshly migrated PostgreSQL database: users, threads, steps, feedback."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from backend.auth import Role, UserStore
from backend.auth import User as StoredUser
from backend.db import migrate, open_pool

with warnings.catch_warnings():
    # Importing chainlit imports traceloop, whose pydantic models use the deprecated class Config.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"traceloop\.")
    from chainlit.types import Feedback, Pagination, ThreadFilter
    from chainlit.user import User

    from chat_ui.data_layer import ACTING_USER, FeedbackRefused, PostgresDataLayer

PASSWORD = "correct horse"


@pytest.fixture
async def pool(database: str) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(database)
    pool = await open_pool(database, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def users(pool: AsyncConnectionPool) -> UserStore:
    return UserStore(pool)


@pytest.fixture
def layer(pool: AsyncConnectionPool, users: UserStore) -> PostgresDataLayer:
    return PostgresDataLayer(pool, users)


@pytest.fixture
async def alice(users: UserStore) -> StoredUser:
    return await users.create("alice", PASSWORD, role=Role.KB_ADMIN)


def _step(step_id: str, thread_id: str, output: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "threadId": thread_id, "type": "assistant_message", "name": "Qwen",
            "output": output, "start": "2026-01-01T00:00:00Z", **fields}  # fmt: skip


async def _thread_with_step(layer: PostgresDataLayer, thread_id: str, user: StoredUser) -> None:
    await layer.update_thread(thread_id, name=f"name {thread_id}", user_id=user.id)
    await layer.create_step(_step(f"{thread_id}-step", thread_id, "你好"))


async def _listed(
    layer: PostgresDataLayer, user: StoredUser, *, first: int = 20, cursor: str | None = None
) -> list[str]:
    page = await layer.list_threads(
        Pagination(first=first, cursor=cursor), ThreadFilter(userId=user.id)
    )
    return [thread["id"] for thread in page.data]


async def test_get_user_has_role(layer: PostgresDataLayer, alice: StoredUser) -> None:
    persisted = await layer.get_user("alice")
    assert persisted is not None
    assert (persisted.id, persisted.metadata) == (alice.id, {"role": "kb_admin"})


async def test_get_unknown_user_is_none(layer: PostgresDataLayer) -> None:
    assert await layer.get_user("nobody") is None


async def test_create_user_returns_existing(layer: PostgresDataLayer, alice: StoredUser) -> None:
    persisted = await layer.create_user(User(identifier="alice"))
    assert persisted is not None and persisted.id == alice.id


async def test_create_user_never_creates(layer: PostgresDataLayer, users: UserStore) -> None:
    assert await layer.create_user(User(identifier="mallory")) is None
    assert await users.get("mallory") is None


async def test_thread_round_trip(layer: PostgresDataLayer, alice: StoredUser) -> None:
    await layer.update_thread("t1", name="第一个", user_id=alice.id, metadata={"k": "v"})
    thread = await layer.get_thread("t1")
    assert thread is not None
    fields = (thread["name"], thread["userId"], thread["userIdentifier"], thread["metadata"])
    assert fields == ("第一个", alice.id, "alice", {"k": "v"})


async def test_steps_come_back_in_order(layer: PostgresDataLayer, alice: StoredUser) -> None:
    await layer.update_thread("t1", user_id=alice.id)
    for step_id in ("z-question", "m-answer", "a-followup"):
        await layer.create_step(_step(step_id, "t1", step_id))
    thread = await layer.get_thread("t1")
    assert thread is not None
    assert [s["id"] for s in thread["steps"]] == ["z-question", "m-answer", "a-followup"]


async def test_step_keeps_extra_fields(layer: PostgresDataLayer, alice: StoredUser) -> None:
    await layer.update_thread("t1", user_id=alice.id)
    await layer.create_step(_step("s1", "t1", "答", showInput="json", language="python"))
    thread = await layer.get_thread("t1")
    assert thread is not None
    [step] = thread["steps"]
    assert (step["output"], step["showInput"], step["language"]) == ("答", "json", "python")


async def test_thread_owner_is_not_replaced(
    layer: PostgresDataLayer, users: UserStore, alice: StoredUser
) -> None:
    mallory = await users.create("mallory", PASSWORD)
    await layer.update_thread("t1", user_id=alice.id)
    await layer.update_thread("t1", user_id=mallory.id)
    assert await layer.get_thread_author("t1") == "alice"


async def test_unknown_thread_is_none(layer: PostgresDataLayer) -> None:
    assert await layer.get_thread("missing") is None


async def test_list_only_own_threads(
    layer: PostgresDataLayer, users: UserStore, alice: StoredUser
) -> None:
    bob = await users.create("bob", PASSWORD)
    await _thread_with_step(layer, "alice-1", alice)
    await _thread_with_step(layer, "bob-1", bob)
    assert await _listed(layer, alice) == ["alice-1"]


async def test_list_newest_first(layer: PostgresDataLayer, alice: StoredUser) -> None:
    for thread_id in ("t-b", "t-c", "t-a"):
        await _thread_with_step(layer, thread_id, alice)
    assert await _listed(layer, alice) == ["t-a", "t-c", "t-b"]


async def test_new_step_moves_thread_first(layer: PostgresDataLayer, alice: StoredUser) -> None:
    for thread_id in ("t1", "t2"):
        await _thread_with_step(layer, thread_id, alice)
    await layer.create_step(_step("t1-again", "t1", "再问"))
    assert await _listed(layer, alice) == ["t1", "t2"]


async def test_list_paginates_with_cursor(layer: PostgresDataLayer, alice: StoredUser) -> None:
    for thread_id in ("t1", "t2", "t3"):
        await _thread_with_step(layer, thread_id, alice)
    first = await layer.list_threads(Pagination(first=2), ThreadFilter(userId=alice.id))
    rest = await _listed(layer, alice, first=2, cursor=first.pageInfo.endCursor)
    pages = ([t["id"] for t in first.data], first.pageInfo.hasNextPage, rest)
    assert pages == (["t3", "t2"], True, ["t1"])


async def test_list_excludes_threads_without_steps(
    layer: PostgresDataLayer, alice: StoredUser
) -> None:
    await layer.update_thread("empty", user_id=alice.id)
    await _thread_with_step(layer, "used", alice)
    assert await _listed(layer, alice) == ["used"]


async def test_list_without_user_is_empty(layer: PostgresDataLayer, alice: StoredUser) -> None:
    await _thread_with_step(layer, "t1", alice)
    page = await layer.list_threads(Pagination(first=20), ThreadFilter())
    assert page.data == []


async def test_update_step_changes_output(layer: PostgresDataLayer, alice: StoredUser) -> None:
    await layer.update_thread("t1", user_id=alice.id)
    await layer.create_step(_step("s1", "t1", "草稿"))
    await layer.update_step(_step("s1", "t1", "定稿"))
    thread = await layer.get_thread("t1")
    assert thread is not None and [s["output"] for s in thread["steps"]] == ["定稿"]


async def test_delete_thread_removes_steps(
    layer: PostgresDataLayer, pool: AsyncConnectionPool, alice: StoredUser
) -> None:
    await _thread_with_step(layer, "t1", alice)
    await layer.delete_thread("t1")
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM steps WHERE thread_id = 't1'")
        row = await cur.fetchone()
    assert (await layer.get_thread("t1"), row) == (None, (0,))


async def _feedback_of(layer: PostgresDataLayer, thread_id: str) -> Any:
    thread = await layer.get_thread(thread_id)
    assert thread is not None
    return thread["steps"][0].get("feedback")


@pytest.fixture
def acting(alice: StoredUser) -> Iterator[None]:
    """Feedback calls run as alice, as Chainlit's HTTP endpoints would after her login."""
    token = ACTING_USER.set(alice.identifier)
    yield
    ACTING_USER.reset(token)


async def test_feedback_is_stored(
    layer: PostgresDataLayer, alice: StoredUser, acting: None
) -> None:
    await _thread_with_step(layer, "t1", alice)
    feedback_id = await layer.upsert_feedback(Feedback(forId="t1-step", value=1, comment="好"))
    feedback = await _feedback_of(layer, "t1")
    assert (feedback["id"], feedback["value"], feedback["comment"]) == (feedback_id, 1, "好")


async def test_feedback_upsert_replaces(
    layer: PostgresDataLayer, alice: StoredUser, acting: None
) -> None:
    await _thread_with_step(layer, "t1", alice)
    feedback_id = await layer.upsert_feedback(Feedback(forId="t1-step", value=1))
    await layer.upsert_feedback(Feedback(id=feedback_id, forId="t1-step", value=0, comment="差"))
    feedback = await _feedback_of(layer, "t1")
    assert (feedback["value"], feedback["comment"]) == (0, "差")


async def test_delete_feedback(layer: PostgresDataLayer, alice: StoredUser, acting: None) -> None:
    await _thread_with_step(layer, "t1", alice)
    feedback_id = await layer.upsert_feedback(Feedback(forId="t1-step", value=1))
    deleted = (await layer.delete_feedback(feedback_id), await layer.delete_feedback(feedback_id))
    assert (deleted, await _feedback_of(layer, "t1")) == ((True, False), None)


async def _bob_acting(users: UserStore, layer: PostgresDataLayer) -> None:
    bob = await users.create("bob", PASSWORD, role=Role.USER)
    await _thread_with_step(layer, "t2", bob)
    ACTING_USER.set("bob")


async def test_feedback_on_another_users_message_is_refused(
    layer: PostgresDataLayer, users: UserStore, alice: StoredUser
) -> None:
    await _thread_with_step(layer, "t1", alice)
    await _bob_acting(users, layer)
    with pytest.raises(FeedbackRefused):
        await layer.upsert_feedback(Feedback(forId="t1-step", value=0))
    assert await _feedback_of(layer, "t1") is None


async def test_replacing_another_users_feedback_is_refused(
    layer: PostgresDataLayer, users: UserStore, alice: StoredUser
) -> None:
    await _thread_with_step(layer, "t1", alice)
    token = ACTING_USER.set("alice")
    feedback_id = await layer.upsert_feedback(Feedback(forId="t1-step", value=1))
    ACTING_USER.reset(token)
    await _bob_acting(users, layer)  # bob names alice's feedback id on his own message
    with pytest.raises(FeedbackRefused):
        await layer.upsert_feedback(Feedback(id=feedback_id, forId="t2-step", value=0))
    with pytest.raises(FeedbackRefused):
        await layer.delete_feedback(feedback_id)
    assert (await _feedback_of(layer, "t1"))["value"] == 1


async def test_feedback_without_a_login_is_refused(
    layer: PostgresDataLayer, alice: StoredUser
) -> None:
    await _thread_with_step(layer, "t1", alice)
    with pytest.raises(FeedbackRefused):
        await layer.upsert_feedback(Feedback(forId="t1-step", value=1))


async def test_thread_author(layer: PostgresDataLayer, alice: StoredUser) -> None:
    await _thread_with_step(layer, "t1", alice)
    assert await layer.get_thread_author("t1") == "alice"


async def test_unknown_thread_has_no_author(layer: PostgresDataLayer) -> None:
    assert await layer.get_thread_author("missing") == ""
