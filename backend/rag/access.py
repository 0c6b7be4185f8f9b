"""Who may read and write a knowledge base: the SQL predicates, and lookups that apply them.

Access is decided inside the SQL of every read, write and search, never by filtering rows in
Python, so no code path can return a row the predicate did not admit. The predicates refer to
`rag_kbs` as `k` and take the named parameters of `acl_params`.

    READ   admin; or the KB is public; or a grant row (read or write) names the user; or the user
           is a kb_admin who created it
    WRITE  admin; or a kb_admin who created it or holds a 'write' grant. Role `user` never writes.

WRITE implies READ. A KB the principal may not read is reported exactly like one that does not
exist (KnowledgeBaseNotFound, DocumentNotFound), so its existence does not leak; one it may read
but not write raises Forbidden.
"""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import AsyncConnection

from backend.auth import Principal
from backend.errors import DocumentNotFound, Forbidden, KnowledgeBaseNotFound
from backend.rag.records import (
    DOCUMENT_COLUMNS,
    KB_COLUMNS,
    DocumentRecord,
    KnowledgeBase,
    document_from_row,
    kb_from_row,
)

READABLE = """(
    %(acl_role)s = 'admin'
    OR k.public
    OR (%(acl_role)s = 'kb_admin' AND k.created_by = %(acl_user)s)
    OR EXISTS (
        SELECT 1 FROM rag_kb_grants g WHERE g.kb_id = k.id AND g.user_identifier = %(acl_user)s
    )
)"""

WRITABLE = """(
    %(acl_role)s = 'admin'
    OR (%(acl_role)s = 'kb_admin' AND (
        k.created_by = %(acl_user)s
        OR EXISTS (
            SELECT 1 FROM rag_kb_grants g
            WHERE g.kb_id = k.id AND g.user_identifier = %(acl_user)s AND g.access = 'write'
        )
    ))
)"""

# The ids of the KBs the principal may read, narrowed to the names in %(kb_names)s unless NULL.
READABLE_KB_IDS = f"""(
    SELECT k.id FROM rag_kbs k
    WHERE {READABLE} AND (%(kb_names)s::text[] IS NULL OR k.name = ANY(%(kb_names)s::text[]))
)"""  # noqa: S608 - constant fragments only

_KB = f"SELECT {KB_COLUMNS}, {WRITABLE} FROM rag_kbs k WHERE k.name = %(name)s AND {READABLE}"  # noqa: S608
_DOCUMENT = f"""
    SELECT {DOCUMENT_COLUMNS}, {WRITABLE}
    FROM rag_documents d JOIN rag_kbs k ON k.id = d.kb_id
    WHERE d.id = %(id)s AND {READABLE}
"""  # noqa: S608


def acl_params(principal: Principal) -> dict[str, str]:
    """The parameters READABLE and WRITABLE refer to."""
    return {"acl_user": principal.user, "acl_role": principal.role.value}


async def kb_for(
    conn: AsyncConnection[Any],
    name: str,
    *,
    principal: Principal,
    write: bool = False,
    lock: bool = False,
) -> KnowledgeBase:
    """The knowledge base `name` as the principal sees it (row locked FOR UPDATE with `lock`,
    inside the caller's transaction). Raises KnowledgeBaseNotFound (absent or unreadable),
    Forbidden (`write` and not writable)."""
    cur = await conn.execute(
        _KB + (" FOR UPDATE" if lock else ""), {"name": name, **acl_params(principal)}
    )
    row = await cur.fetchone()
    if row is None:
        raise KnowledgeBaseNotFound(f"no readable knowledge base {name!r}")
    kb = kb_from_row(row)
    if write and not kb.writable:
        raise Forbidden(f"{principal.user} may not change knowledge base {name!r}")
    return kb


async def document_for(
    conn: AsyncConnection[Any], document_id: str, *, principal: Principal, write: bool = False
) -> DocumentRecord:
    """The document as the principal may see it (row locked FOR UPDATE with `write`, inside the
    caller's transaction). Raises DocumentNotFound (absent, malformed id, or its knowledge base
    unreadable), Forbidden (`write` and not writable)."""
    if parse_uuid(document_id) is None:
        raise DocumentNotFound(f"no document {document_id!r}")
    cur = await conn.execute(
        _DOCUMENT + (" FOR UPDATE OF d" if write else ""),
        {"id": document_id, **acl_params(principal)},
    )
    row = await cur.fetchone()
    if row is None:
        raise DocumentNotFound(f"no readable document {document_id!r}")
    if write and not row[-1]:
        raise Forbidden(f"{principal.user} may not change document {document_id!r}")
    return document_from_row(row[:-1])


def parse_uuid(value: str) -> uuid.UUID | None:
    """`value` as a UUID, None if it is not one (ids come from URLs)."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
