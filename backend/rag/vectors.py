"""pgvector adapters for numpy arrays, registered per cursor.

The pool's connections are shared with code that knows nothing of pgvector, so the adapters are
registered on the cursors this package creates, never on a connection: a numpy array passed as a
parameter (or written by COPY) is sent as pgvector's binary `vector`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pgvector.psycopg.vector import VectorBinaryDumper, VectorDumper
from psycopg import AsyncConnection, AsyncCursor
from psycopg.adapt import Dumper
from psycopg.types import TypeInfo

from backend.errors import KnowledgeBaseError


class VectorAdapters:
    """Makes cursors that send numpy arrays as `vector`.

    The type's OID is looked up on first use and cached, which holds while the `vector` extension
    is not dropped and recreated under a running process. Safe to share between tasks.
    """

    def __init__(self) -> None:
        self._info: TypeInfo | None = None
        self._dumpers: tuple[type[Dumper], type[Dumper]] | None = None

    async def cursor(self, conn: AsyncConnection[Any]) -> AsyncCursor[Any]:
        """A new cursor of `conn` with the adapters registered (the COPY type name `vector` too).

        Raises KnowledgeBaseError if the database lacks the `vector` extension.
        """
        if self._info is None or self._dumpers is None:
            info = await TypeInfo.fetch(conn, "vector")
            if info is None:
                raise KnowledgeBaseError("the database has no `vector` type (pgvector missing)")
            text = type("_Vector", (VectorDumper,), {"oid": info.oid})
            binary = type("_VectorBinary", (VectorBinaryDumper,), {"oid": info.oid})
            self._info, self._dumpers = info, (text, binary)
        cur = conn.cursor()
        self._info.register(cur)
        for dumper in self._dumpers:  # text first: the last one registered serves `%s`
            cur.adapters.register_dumper(np.ndarray, dumper)
        return cur
