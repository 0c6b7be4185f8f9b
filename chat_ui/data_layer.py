"""Chainlit's persistence interface on our PostgreSQL schema (migration 0001).

Threads, steps and feedback are stored so a page reload, or a reconnect to another chat_ui replica,
lists and resumes the user's threads. Step fields we do not query on are kept in `extra` (jsonb).
Chainlit authorises a resume by comparing `userIdentifier` of `get_thread` with the logged-in user;
`list_threads` is always filtered by the user id Chainlit passes. Threads are never shared: Chainlit's
share endpoints ignore `allow_thread_sharing = false`, so the share flag is neither stored nor
returned, and `/project/share/{id}` finds no thread shared. Chainlit's feedback endpoints check no
ownership either: feedback is written or deleted only for a step of a thread of `ACTING_USER` (the
logged-in user of the HTTP request, set by `remember_user`); anything else raises
FeedbackRefused.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from chainlit.data.base import BaseDataLayer
from chainlit.step import StepDict
from chainlit.types import (
    Feedback,
    PageInfo,
    PaginatedResponse,
    Pagination,
    ThreadDict,
    ThreadFilter,
)
from chainlit.user import PersistedUser, User
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from backend.auth import UserStore

logger = logging.getLogger(__name__)

_STEP_COLUMNS = {
    "id",
    "threadId",
    "parentId",
    "name",
    "type",
    "input",
    "output",
    "isError",
    "metadata",
    "start",
    "end",
    "createdAt",
    "feedback",
}

ACTING_USER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "acting_user", default=None
)
"""Identifier of the user an HTTP request to Chainlit was authenticated as (`remember_user`)."""


class FeedbackRefused(PermissionError):
    """Feedback on a message that is not in one of the acting user's threads."""


def remember_user(
    get_current_user: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    """Chainlit's `get_current_user` dependency, also setting ACTING_USER for the request (install
    as a dependency override; FastAPI reads the parameters from the copied signature)."""

    @functools.wraps(get_current_user)
    async def current_user(*args: Any, **kwargs: Any) -> Any:
        user = await get_current_user(*args, **kwargs)
        ACTING_USER.set(getattr(user, "identifier", None))
        return user

    current_user.__signature__ = inspect.signature(get_current_user)  # type: ignore[attr-defined]
    return current_user


_SHARING_KEYS = ("is_shared", "shared_at")
_FEEDBACK_THREAD = "SELECT s.thread_id FROM feedbacks f JOIN steps s ON s.id = f.step_id WHERE f.id = %s"  # Chainlit's thread-sharing metadata, never kept

_THREAD_SQL = """
SELECT t.id, t.name, t.tags, t.metadata, t.created_at, t.user_id, u.identifier
FROM threads t LEFT JOIN users u ON u.id = t.user_id
"""


def _iso(value: Any) -> str:
    return value.isoformat() if value is not None else ""


class PostgresDataLayer(BaseDataLayer):
    def __init__(self, pool: AsyncConnectionPool, users: UserStore) -> None:
        self._pool = pool
        self._users = users

    # users -----------------------------------------------------------------
    async def get_user(self, identifier: str) -> PersistedUser | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, identifier, role, created_at FROM users WHERE identifier = %s",
                (identifier,),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return PersistedUser(
            id=str(row[0]), identifier=row[1], createdAt=_iso(row[3]), metadata={"role": row[2]}
        )

    async def create_user(self, user: User) -> PersistedUser | None:
        """Users are created by the CLI or SSO provisioning, never implicitly at login."""
        return await self.get_user(user.identifier)

    # threads ---------------------------------------------------------------
    async def _ensure_thread(self, conn: Any, thread_id: str) -> None:
        await conn.execute(
            "INSERT INTO threads (id) VALUES (%s) ON CONFLICT (id) DO NOTHING", (thread_id,)
        )

    async def update_thread(
        self,
        thread_id: str,
        name: str | None = None,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        tags: list[str] | None = None,
    ) -> None:
        if metadata is not None:
            metadata = {k: v for k, v in metadata.items() if k not in _SHARING_KEYS}
        async with self._pool.connection() as conn, conn.transaction():
            await self._ensure_thread(conn, thread_id)
            await conn.execute(
                "UPDATE threads SET"
                " name = COALESCE(%(name)s, name),"
                " user_id = COALESCE(user_id, %(user_id)s::uuid),"
                " metadata = metadata || COALESCE(%(metadata)s, '{}'::jsonb),"
                " tags = COALESCE(%(tags)s, tags),"
                " updated_at = now()"
                " WHERE id = %(id)s",
                {
                    "id": thread_id,
                    "name": name[:200] if name else None,
                    "user_id": user_id,
                    "metadata": Jsonb(_jsonable(metadata)) if metadata is not None else None,
                    "tags": tags,
                },
            )

    async def get_thread_author(self, thread_id: str) -> str:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT u.identifier FROM threads t JOIN users u ON u.id = t.user_id"
                " WHERE t.id = %s",
                (thread_id,),
            )
            row = await cur.fetchone()
        return str(row[0]) if row else ""

    async def delete_thread(self, thread_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("DELETE FROM threads WHERE id = %s", (thread_id,))

    async def get_thread(self, thread_id: str) -> ThreadDict | None:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_THREAD_SQL + " WHERE t.id = %s", (thread_id,))
            row = await cur.fetchone()
            if row is None:
                return None
            await cur.execute(
                "SELECT s.*, f.id AS feedback_id, f.value AS feedback_value,"
                " f.comment AS feedback_comment"
                " FROM steps s LEFT JOIN feedbacks f ON f.step_id = s.id"
                " WHERE s.thread_id = %s ORDER BY s.seq",
                (thread_id,),
            )
            steps = [self._step_dict(s) for s in await cur.fetchall()]
        thread = self._thread_dict(row)
        thread["steps"] = steps  # type: ignore[typeddict-item]  # our dicts carry StepDict keys
        return thread

    async def list_threads(
        self, pagination: Pagination, filters: ThreadFilter
    ) -> PaginatedResponse[ThreadDict]:
        if not filters.userId:
            return PaginatedResponse(PageInfo(False, None, None), [])
        clauses = [
            "t.user_id = %(user_id)s::uuid",
            "EXISTS (SELECT 1 FROM steps s WHERE s.thread_id = t.id)",
        ]
        params: dict[str, Any] = {"user_id": filters.userId, "limit": pagination.first + 1}
        if filters.search:
            clauses.append("t.name ILIKE %(search)s")
            escaped = filters.search.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
            params["search"] = "%" + escaped + "%"
        if pagination.cursor:
            clauses.append(
                "(t.updated_at, t.id) < (SELECT updated_at, id FROM threads WHERE id = %(cursor)s)"
            )
            params["cursor"] = pagination.cursor
        sql = (
            _THREAD_SQL
            + " WHERE "
            + " AND ".join(clauses)
            + " ORDER BY t.updated_at DESC, t.id DESC LIMIT %(limit)s"
        )
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        has_next = len(rows) > pagination.first
        threads = [self._thread_dict(r) for r in rows[: pagination.first]]
        end = threads[-1]["id"] if threads else None
        start = threads[0]["id"] if threads else None
        return PaginatedResponse(PageInfo(has_next, start, end), threads)

    # steps -----------------------------------------------------------------
    async def create_step(self, step_dict: dict[str, Any]) -> None:
        await self._upsert_step(step_dict)

    async def update_step(self, step_dict: dict[str, Any]) -> None:
        await self._upsert_step(step_dict)

    async def _upsert_step(self, step: dict[str, Any]) -> None:
        thread_id = step.get("threadId")
        if not thread_id or not step.get("id"):
            return
        extra = {k: v for k, v in step.items() if k not in _STEP_COLUMNS}
        values = {
            "id": step["id"],
            "thread_id": thread_id,
            "parent_id": step.get("parentId"),
            "name": step.get("name") or "",
            "type": step.get("type") or "undefined",
            "input": step.get("input") or "",
            "output": step.get("output") or "",
            "is_error": bool(step.get("isError")),
            "metadata": Jsonb(_jsonable(step.get("metadata") or {})),
            "extra": Jsonb(_jsonable(extra)),
            "start_time": step.get("start"),
            "end_time": step.get("end"),
        }
        async with self._pool.connection() as conn, conn.transaction():
            await self._ensure_thread(conn, thread_id)
            await conn.execute(
                "INSERT INTO steps (id, thread_id, parent_id, name, type, input, output, is_error,"
                " metadata, extra, start_time, end_time) VALUES (%(id)s, %(thread_id)s,"
                " %(parent_id)s, %(name)s, %(type)s, %(input)s, %(output)s, %(is_error)s,"
                " %(metadata)s, %(extra)s, %(start_time)s, %(end_time)s)"
                " ON CONFLICT (id) DO UPDATE SET"
                " name = EXCLUDED.name, input = EXCLUDED.input, output = EXCLUDED.output,"
                " is_error = EXCLUDED.is_error, metadata = EXCLUDED.metadata,"
                " extra = EXCLUDED.extra, end_time = EXCLUDED.end_time"
                " WHERE steps.thread_id = EXCLUDED.thread_id",
                values,
            )
            await conn.execute("UPDATE threads SET updated_at = now() WHERE id = %s", (thread_id,))

    async def delete_step(self, step_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("DELETE FROM steps WHERE id = %s", (step_id,))

    # feedback ----------------------------------------------------------------
    async def upsert_feedback(self, feedback: Feedback) -> str:
        """Raises FeedbackRefused unless the step, and the feedback being replaced if any, are in
        a thread of the acting user."""
        feedback_id = feedback.id or feedback.forId
        async with self._pool.connection() as conn:
            await self._check_owner(
                conn, "SELECT thread_id FROM steps WHERE id = %s", feedback.forId
            )
            await self._check_owner(conn, _FEEDBACK_THREAD, feedback_id, missing_ok=True)
            await conn.execute(
                "INSERT INTO feedbacks (id, step_id, value, comment) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value,"
                " comment = EXCLUDED.comment",
                (feedback_id, feedback.forId, int(feedback.value), feedback.comment),
            )
        return str(feedback_id)

    async def delete_feedback(self, feedback_id: str) -> bool:
        """Raises FeedbackRefused unless the feedback is in a thread of the acting user (or does
        not exist: False)."""
        async with self._pool.connection() as conn:
            await self._check_owner(conn, _FEEDBACK_THREAD, feedback_id, missing_ok=True)
            cur = await conn.execute("DELETE FROM feedbacks WHERE id = %s", (feedback_id,))
        return cur.rowcount > 0

    async def _check_owner(
        self, conn: Any, thread_of: str, key: str, *, missing_ok: bool = False
    ) -> None:
        """The thread `thread_of` finds for `key` must belong to ACTING_USER."""
        acting = ACTING_USER.get()
        row = await (await conn.execute(thread_of, (key,))).fetchone()
        if row is None and missing_ok:
            return
        if acting is None or row is None or await self.get_thread_author(row[0]) != acting:
            raise FeedbackRefused("feedback only on your own messages")

    # elements: not persisted (no file attachments in chat yet) ------------------
    async def create_element(self, element: Any) -> None:
        return None

    async def get_element(self, thread_id: str, element_id: str) -> None:
        return None

    async def delete_element(self, element_id: str, thread_id: str | None = None) -> None:
        return None

    async def get_favorite_steps(self, user_id: str) -> list[StepDict]:
        return []

    async def build_debug_url(self) -> str:
        return ""

    async def close(self) -> None:
        """The pool belongs to the app's lifespan, which closes it."""

    # shapes ------------------------------------------------------------------
    @staticmethod
    def _thread_dict(row: dict[str, Any]) -> ThreadDict:
        return {
            "id": row["id"],
            "createdAt": _iso(row["created_at"]),
            "name": row["name"],
            "userId": str(row["user_id"]) if row["user_id"] else None,
            "userIdentifier": row["identifier"],
            "tags": list(row["tags"] or []),
            "metadata": {
                k: v for k, v in (row["metadata"] or {}).items() if k not in _SHARING_KEYS
            },
            "steps": [],
            "elements": [],
        }

    @staticmethod
    def _step_dict(row: dict[str, Any]) -> dict[str, Any]:
        step: dict[str, Any] = dict(row["extra"] or {})
        step.update(
            id=row["id"],
            threadId=row["thread_id"],
            parentId=row["parent_id"],
            name=row["name"],
            type=row["type"],
            input=row["input"],
            output=row["output"],
            isError=row["is_error"],
            metadata=row["metadata"] or {},
            start=row["start_time"],
            end=row["end_time"],
            createdAt=_iso(row["created_at"]),
        )
        if row.get("feedback_id"):
            step["feedback"] = {
                "id": row["feedback_id"],
                "forId": row["id"],
                "value": row["feedback_value"],
                "comment": row["feedback_comment"],
            }
        return step


def _jsonable(value: Any) -> Any:
    """Chainlit metadata may hold non-JSON values (sets, objects): keep what serialises."""
    return json.loads(json.dumps(value, default=str))


__all__ = ["PostgresDataLayer"]
