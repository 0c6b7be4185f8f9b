"""The RAG worker's HTTP API (FastAPI): knowledge bases, documents, jobs, retrieval.

Callers are chat_ui and the CLI. Each call carries the service token (`Authorization: Bearer ...`,
`QWEN_RAG__SERVICE_TOKEN`) and names the acting user in `X-Qwen-User`; the user's role is read from
the users table here, never taken from the caller. Knowledge-base access is then enforced in the SQL
of every query (backend/rag/store.py). Errors are JSON `{"error": code, "message": 中文}`: no
tracebacks, paths or DSNs.

    GET    /healthz  /readyz  /metrics  /openapi.json
    GET    /v1/kbs                                   readable knowledge bases
    POST   /v1/kbs                                   create (kb_admin, admin)
    DELETE /v1/kbs/{kb}
    GET    /v1/kbs/{kb}/documents                    list
    POST   /v1/kbs/{kb}/documents                    upload one or more files (multipart `files`)
    GET    /v1/kbs/{kb}/documents/{id}               one document (status, progress, error)
    DELETE /v1/kbs/{kb}/documents/{id}
    POST   /v1/kbs/{kb}/documents/{id}/reindex
    GET    /v1/jobs/{id}                             ingestion status of a document
    POST   /v1/retrieve                              ranked chunks for a query
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from backend.auth import Principal, UserStore
from backend.config import Settings
from backend.errors import (
    AuthError,
    DocumentNotFound,
    DocumentRejected,
    Forbidden,
    KnowledgeBaseError,
    KnowledgeBaseNotFound,
    QwenStackError,
    ServiceError,
)
from backend.rag.schemas import (
    CreateKnowledgeBase,
    DocumentOut,
    KnowledgeBaseOut,
    RetrieveRequest,
    RetrieveResponse,
    UploadOut,
)
from backend.rag.service import RagService

logger = logging.getLogger(__name__)

_STATUS: list[tuple[type[QwenStackError], int, str]] = [
    (DocumentRejected, 422, "rejected"),
    (KnowledgeBaseNotFound, 404, "not_found"),
    (DocumentNotFound, 404, "not_found"),
    (Forbidden, 403, "forbidden"),
    (AuthError, 401, "unauthorized"),
    (KnowledgeBaseError, 409, "conflict"),
    (ServiceError, 503, "unavailable"),
]


def error_response(exc: QwenStackError) -> JSONResponse:
    """The JSON error for one of ours: a stable code and the Chinese message, nothing else."""
    status, code = 500, "internal"
    for kind, kind_status, kind_code in _STATUS:
        if isinstance(exc, kind):
            status, code = kind_status, kind_code
            break
    body: dict[str, Any] = {"error": code, "message": exc.user_message}
    if isinstance(exc, DocumentRejected):
        body["reason"] = str(exc.reason)
    return JSONResponse(body, status_code=status)


def _service(request: Request) -> RagService:
    return request.app.state.service  # type: ignore[no-any-return]


async def _principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_qwen_user: Annotated[str | None, Header()] = None,
) -> Principal:
    """The acting user: the service token must match; the role comes from the users table."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.encode(), request.app.state.token
    ):
        raise AuthError("missing or wrong service token")
    if not x_qwen_user:
        raise AuthError("no acting user")
    user = await UserStore(_service(request).pool).get(x_qwen_user)
    if user is None:
        raise Forbidden("unknown acting user")
    return Principal(user=user.identifier, role=user.role)


Who = Annotated[Principal, Depends(_principal)]
Svc = Annotated[RagService, Depends(_service)]


def create_app(settings: Settings | None = None, *, service: RagService | None = None) -> FastAPI:
    """The ASGI app. `service` (tests) replaces the one built from settings in the lifespan."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service is not None:
            app.state.service = service
            yield
            return
        built = await RagService.start(settings)
        app.state.service = built
        try:
            yield
        finally:
            await built.aclose()

    app = FastAPI(
        title="qwen-stack RAG worker", version="1", lifespan=lifespan, docs_url=None,
        redoc_url=None,
    )  # fmt: skip
    app.state.token = settings.rag.service_token.get_secret_value().encode()
    if service is not None:  # also without a lifespan run (in-process ASGI transports)
        app.state.service = service

    @app.exception_handler(QwenStackError)
    async def on_ours(request: Request, exc: QwenStackError) -> JSONResponse:
        if not isinstance(exc, KnowledgeBaseError | AuthError):
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid", "message": "请求参数有误。"}, status_code=422)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            {"error": "internal", "message": "知识库服务出错，请稍后再试。"}, status_code=500
        )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(service: Svc) -> JSONResponse:
        checks = await service.checks()
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(checks, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(service: Svc) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/kbs")
    async def list_kbs(who: Who, service: Svc) -> list[KnowledgeBaseOut]:
        return [KnowledgeBaseOut.of(kb) for kb in await service.store.list_kbs(principal=who)]

    @app.post("/v1/kbs", status_code=201)
    async def create_kb(body: CreateKnowledgeBase, who: Who, service: Svc) -> KnowledgeBaseOut:
        kb = await service.store.create_kb(
            body.name, principal=who, description=body.description, public=body.public
        )
        return KnowledgeBaseOut.of(kb)

    @app.delete("/v1/kbs/{kb}", status_code=204)
    async def delete_kb(kb: str, who: Who, service: Svc) -> Response:
        await service.delete_kb(kb, principal=who)
        return Response(status_code=204)

    @app.get("/v1/kbs/{kb}/documents")
    async def list_documents(kb: str, who: Who, service: Svc) -> list[DocumentOut]:
        found = await service.store.get_kb(kb, principal=who)
        return [DocumentOut.of(d) for d in await service.store.list_documents(found, principal=who)]

    @app.post("/v1/kbs/{kb}/documents", status_code=202)
    async def upload(
        kb: str, who: Who, service: Svc, files: Annotated[list[UploadFile], File()]
    ) -> list[UploadOut]:
        target = await service.store.get_kb(kb, principal=who, write=True)
        results = []
        for upload in files:
            try:
                record, created = await service.add_upload(
                    target, upload.file, filename=upload.filename or "", principal=who
                )
                results.append(UploadOut.of_document(record, duplicate=not created))
            except DocumentRejected as exc:
                results.append(UploadOut.rejected(upload.filename or "", exc))
            finally:
                await upload.close()
        return results

    @app.get("/v1/kbs/{kb}/documents/{document_id}")
    async def get_document(kb: str, document_id: str, who: Who, service: Svc) -> DocumentOut:
        return DocumentOut.of(await service.document_in(kb, document_id, principal=who))

    @app.delete("/v1/kbs/{kb}/documents/{document_id}", status_code=204)
    async def delete_document(kb: str, document_id: str, who: Who, service: Svc) -> Response:
        await service.delete_document(kb, document_id, principal=who)
        return Response(status_code=204)

    @app.post("/v1/kbs/{kb}/documents/{document_id}/reindex", status_code=202)
    async def reindex(kb: str, document_id: str, who: Who, service: Svc) -> DocumentOut:
        return DocumentOut.of(await service.reindex(kb, document_id, principal=who))

    @app.get("/v1/jobs/{document_id}")
    async def job(document_id: str, who: Who, service: Svc) -> DocumentOut:
        return DocumentOut.of(await service.store.get_document(document_id, principal=who))

    @app.post("/v1/retrieve")
    async def retrieve(body: RetrieveRequest, who: Who, service: Svc) -> RetrieveResponse:
        hits = await service.retrieve(body.query, principal=who, kbs=body.kbs, top_k=body.top_k)
        return RetrieveResponse.of(hits)

    return app
