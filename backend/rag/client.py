"""The RAG worker's client, used by chat_ui and the CLI.

Every call names the acting user; the worker looks up that user's role itself. Transport failures
become RagUnavailable; the worker's JSON errors become the matching error of our tree, so callers
show `user_message` as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from backend.errors import (
    AuthError,
    DocumentNotFound,
    DocumentRejected,
    Forbidden,
    KnowledgeBaseError,
    KnowledgeBaseNotFound,
    QwenStackError,
    RagUnavailable,
    RejectReason,
)
from backend.rag.document import Hit
from backend.rag.schemas import DocumentOut, KnowledgeBaseOut, RetrieveResponse, UploadOut

logger = logging.getLogger(__name__)


class RagClient:
    def __init__(
        self, base_url: str, *, token: str, timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:  # fmt: skip
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout_s, connect=3.0),
            headers={"Authorization": f"Bearer {token}"}, transport=transport,
        )  # fmt: skip

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self, method: str, path: str, *, user: str, timeout_s: float | None = None, **kwargs: Any
    ) -> Any:
        headers = {"X-Qwen-User": user}
        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        try:
            response = await self._http.request(method, path, headers=headers, **kwargs, **extra)
        except httpx.TimeoutException as exc:
            raise RagUnavailable(f"RAG worker timed out on {method} {path}") from exc
        except httpx.TransportError as exc:
            raise RagUnavailable(f"RAG worker unreachable: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise _error_of(response)
        if response.status_code == 204:
            return None
        return response.json()

    async def ready(self) -> bool:
        try:
            response = await self._http.get("/readyz", timeout=3.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def retrieve(
        self, query: str, *, user: str, kbs: Sequence[str] | None = None, top_k: int = 5,
        timeout_s: float | None = None,
    ) -> list[Hit]:  # fmt: skip
        body = {"query": query, "kbs": list(kbs) if kbs is not None else None, "top_k": top_k}
        data = await self._call("POST", "/v1/retrieve", user=user, json=body, timeout_s=timeout_s)
        return [hit.to_hit() for hit in RetrieveResponse.model_validate(data).hits]

    async def list_kbs(self, *, user: str) -> list[KnowledgeBaseOut]:
        data = await self._call("GET", "/v1/kbs", user=user)
        return [KnowledgeBaseOut.model_validate(kb) for kb in data]

    async def create_kb(
        self, name: str, *, user: str, description: str = "", public: bool = True
    ) -> KnowledgeBaseOut:
        body = {"name": name, "description": description, "public": public}
        return KnowledgeBaseOut.model_validate(
            await self._call("POST", "/v1/kbs", user=user, json=body)
        )

    async def delete_kb(self, name: str, *, user: str) -> None:
        await self._call("DELETE", f"/v1/kbs/{name}", user=user)

    async def list_documents(self, kb: str, *, user: str) -> list[DocumentOut]:
        data = await self._call("GET", f"/v1/kbs/{kb}/documents", user=user)
        return [DocumentOut.model_validate(d) for d in data]

    async def upload(
        self, kb: str, files: Sequence[tuple[str, bytes]], *, user: str
    ) -> list[UploadOut]:
        """Upload (name, content) pairs in one request; one result per file, in order."""
        parts = [("files", (name, content, "application/octet-stream")) for name, content in files]
        data = await self._call(
            "POST", f"/v1/kbs/{kb}/documents", user=user, files=parts, timeout_s=300.0
        )
        return [UploadOut.model_validate(item) for item in data]

    async def upload_paths(self, kb: str, paths: Sequence[Path], *, user: str) -> list[UploadOut]:
        files = [(path.name, await asyncio.to_thread(path.read_bytes)) for path in paths]
        return await self.upload(kb, files, user=user)

    async def document(self, kb: str, document_id: str, *, user: str) -> DocumentOut:
        return DocumentOut.model_validate(
            await self._call("GET", f"/v1/kbs/{kb}/documents/{document_id}", user=user)
        )

    async def job(self, document_id: str, *, user: str) -> DocumentOut:
        return DocumentOut.model_validate(
            await self._call("GET", f"/v1/jobs/{document_id}", user=user)
        )

    async def delete_document(self, kb: str, document_id: str, *, user: str) -> None:
        await self._call("DELETE", f"/v1/kbs/{kb}/documents/{document_id}", user=user)

    async def reindex(self, kb: str, document_id: str, *, user: str) -> DocumentOut:
        return DocumentOut.model_validate(
            await self._call("POST", f"/v1/kbs/{kb}/documents/{document_id}/reindex", user=user)
        )


def _error_of(response: httpx.Response) -> QwenStackError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    code = body.get("error", "") if isinstance(body, dict) else ""
    detail = f"RAG worker answered {response.status_code} {code}"
    if response.status_code == 422 and "reason" in body:
        try:
            return DocumentRejected(RejectReason(body["reason"]), detail)
        except ValueError:
            pass
    if response.status_code == 404:
        path = response.request.url.path
        return (
            DocumentNotFound(detail)
            if "/documents/" in path or "/jobs/" in path
            else (KnowledgeBaseNotFound(detail))
        )
    if response.status_code == 403:
        return Forbidden(detail)
    if response.status_code == 401:
        return AuthError(detail)
    if response.status_code == 409:
        error = KnowledgeBaseError(detail)
        return error
    if response.status_code >= 500:
        return RagUnavailable(detail)
    return KnowledgeBaseError(detail)
