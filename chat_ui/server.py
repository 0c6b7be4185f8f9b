"""The chat_ui ASGI app: Chainlit mounted at /chat, plus health routes, with an explicit lifespan.

Run with `uvicorn chat_ui.server:create_app --factory` (`qwen-stack ui` does this). Mounted apps'
lifespans do not run, so everything Chainlit's handlers need is built here and bound to
`chat_ui.runtime` before the first request. The lifespan also takes SIGTERM/SIGINT over from
uvicorn so running answers finish before it stops (`chat_ui.drain`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from backend.config import Settings, export_chainlit_env
from backend.errors import RedisUnavailable
from backend.serving.breaker import BreakerState
from chat_ui import runtime as runtime_module
from chat_ui.drain import ShutdownSignals
from chat_ui.headers import SecurityHeaders
from chat_ui.runtime import Runtime

logger = logging.getLogger(__name__)

GC_THRESHOLDS = (10_000, 10, 10)
"""The young generation is collected after 10,000 net allocations instead of CPython's 700. An
answer allocates thousands of short-lived objects (tasks, futures, chunks), so at 700 the
collector ran every few requests: 460 collections, 283 ms, during bench/overhead.py's measured
batches of the pipeline; at 10,000: 28, 80-108 ms, and the TTFT it adds over the plain client at
32 simultaneous streams went from +4.9 ms p50 / +18.0 ms p99 to -2.3 / +12.2 and -0.3 / +22.8 (two
runs). Cycles live a little longer (a few MB at most)."""

CallNext = Callable[[Request], Awaitable[Response]]

CHAT_PATH = "/chat"
APP_ROOT = Path(__file__).resolve().parent.parent  # holds .chainlit/ and chainlit*.md


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    export_chainlit_env(settings, app_root=APP_ROOT)

    # Chainlit reads its config at import, so it is imported only after the environment is set.
    from chainlit.auth import get_current_user
    from chainlit.config import config as chainlit_config
    from chainlit.server import app as chainlit_app
    from chainlit.utils import mount_chainlit

    from chat_ui.data_layer import remember_user

    chainlit_config.project.allow_origins = list(settings.ui.allow_origins)
    chainlit_config.ui.language = None if settings.ui.language == "auto" else settings.ui.language
    chainlit_config.run.headless = True
    # Chainlit's feedback endpoints check no ownership; the data layer does, for this user.
    chainlit_app.dependency_overrides[get_current_user] = remember_user(get_current_user)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await Runtime.start(settings)
        runtime_module.bind(rt)
        # The start-up heap (Chainlit, the guard's tables, clients: ~290k tracked objects) never
        # becomes garbage; left in the collector's care, each full collection walks it (220 ms,
        # measured, stalling every stream). Frozen, it is skipped.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        # uvicorn's handlers are in place by now: ours replace them (chat_ui/drain.py).
        signals = ShutdownSignals(rt.drain, timeout_s=settings.ui.drain_s)
        signals.install()
        logger.info("chat_ui ready")
        try:
            yield
        finally:
            await signals.aclose()
            runtime_module.bind(None)
            await rt.aclose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def remember_client(request: Request, call_next: CallNext) -> Response:
        """The client address for the per-IP login limit (see runtime.client_ip); behind a
        proxy, uvicorn's --proxy-headers makes it the real client's."""
        token = runtime_module.client_ip.set(request.client.host if request.client else None)
        try:
            return await call_next(request)
        finally:
            runtime_module.client_ip.reset(token)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(CHAT_PATH + "/")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        rt = runtime_module.current()
        if rt.drain.draining:  # SIGTERM: the load balancer sends new sessions elsewhere
            return JSONResponse({"status": "draining"}, status_code=503)
        checks: dict[str, str] = {}
        try:
            await rt.redis.ping()
            checks["redis"] = "ok"
        except Exception:
            checks["redis"] = "down"
        try:
            async with rt.pool.connection() as conn:
                await conn.execute("SELECT 1")
            checks["database"] = "ok"
        except Exception:
            checks["database"] = "down"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(checks, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        rt = runtime_module.current()
        available = rt.engines.available()
        rt.metrics.set_engines(
            up={url: url in available for url in rt.engines.urls},
            breaker_open={
                url: rt.engines.breaker_state(url) is BreakerState.OPEN for url in rt.engines.urls
            },
        )
        # Slots are read from Redis, not counted here: leases expire on their own and other
        # chat_ui processes share the table.
        try:
            in_use: dict[str, int] | None = await rt.slots.occupancy(rt.engines.urls)
        except RedisUnavailable:
            in_use = None  # /readyz reports Redis down
        capacity = {url: rt.slots.capacity if url in available else 0 for url in rt.engines.urls}
        rt.metrics.set_slots(in_use, capacity=capacity)
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    mount_chainlit(app, target=str(APP_ROOT / "chat_ui" / "app.py"), path=CHAT_PATH)
    app.add_middleware(SecurityHeaders)
    return app
