"""The HTTP service: a thin FastAPI shell over ``ServiceCore``. Worker routes sit behind the
pool token, user routes behind the API token, by the router they belong to."""
from __future__ import annotations

import gc
import logging
import threading
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

from pcm_service.api.auth import BearerToken, ReadToken, WorkerToken, api_token, pool_token
from pcm_service.api.changes import Changes
from pcm_service.api.committer import GroupCommitter
from pcm_service.api.errors import BodyLimit, StrictJSONRoute, install_error_handlers
from pcm_service.api.headers import SecurityHeaders
from pcm_service.api.metrics import ServiceMetrics, metrics_router
from pcm_service.api.openai_routes import FILES_PATH, openai_router, validate_batch
from pcm_service.api.page import LOGIN_PATH, LOGOUT_PATH, PAGE_PATH, PageToken, page_routers
from pcm_service.api.user_routes import STREAM_PATH, SUBMIT_PATH, user_router
from pcm_service.api.worker_routes import worker_router
from pcm_service.core import ServiceCore
from pcm_service.executors import Executor, NativeExecutor

log = logging.getLogger("pcm.service")
# the routes without a token (besides the API's own description): health, and the status
# page with its login and logout (the page holds no data; its data route takes a token)
OPEN = {"/healthz", PAGE_PATH, LOGIN_PATH, LOGOUT_PATH}


def _reaper(core: ServiceCore, stop: threading.Event) -> None:
    for batch_id in core.validating_batches():  # created before a restart: check them now
        validate_batch(core, batch_id)
    while not stop.wait(core.config.heartbeat_interval):
        try:
            for worker_id in core.reap():
                log.warning("worker %s missed heartbeats for %.0fs: lost, its batches requeued",
                            worker_id, core.config.worker_timeout)
            core.settle_workloads()
        except Exception:  # the reaper must outlive any one bad cycle
            log.exception("reaper cycle failed")


def create_app(core: ServiceCore, pool: str, api: str, executor: Optional[Executor] = None,
               metrics_token: Optional[str] = None) -> FastAPI:
    """The service's app. ``pool``, ``api``: the two tokens, never interchangeable; ``executor``
    runs leased batches (default: native, PCM's agents pull them over HTTP); ``metrics_token``
    may read ``/metrics`` (and nothing else), as the API token may."""
    executor = executor or NativeExecutor(core)
    if not pool or not api:
        raise ValueError("create_app needs both the pool token and the API token")
    stop = threading.Event()
    changes = Changes()
    committer = GroupCommitter(core.store)
    metrics = ServiceMetrics(core, executor)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        t = threading.Thread(target=_reaper, args=(core, stop), name="pcm-reaper", daemon=True)
        t.start()
        changes.bind()
        executor.start()
        core.replicas.on_change = changes.notify
        # chunk streams and plan requests run in threads: leave room for a large pool
        anyio.to_thread.current_default_thread_limiter().total_tokens = 200
        yield
        stop.set()
        executor.stop()
        committer.stop()
        t.join(timeout=5)

    # no /docs or /redoc: FastAPI loads their scripts from a third-party CDN; /openapi.json
    # describes the API for any OpenAPI viewer
    app = FastAPI(title="PCM service", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.router.route_class = StrictJSONRoute
    install_error_handlers(app)
    cfg = core.config
    app.add_middleware(BodyLimit, limit_for=lambda path: cfg.max_submission_bytes
                       if path in (SUBMIT_PATH, STREAM_PATH, FILES_PATH) else cfg.max_request_bytes)
    app.add_middleware(SecurityHeaders)
    app.state.core = core

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(worker_router(core, changes, executor, committer, metrics, pool_token(pool)))
    app.include_router(user_router(core, executor), dependencies=[Depends(api_token(api))])
    app.include_router(openai_router(core), dependencies=[Depends(api_token(api))])
    app.include_router(metrics_router(metrics), dependencies=[Depends(ReadToken(metrics_token, api))])
    page, page_data = page_routers(core, executor, api)
    app.include_router(page)
    app.include_router(page_data, dependencies=[Depends(PageToken(api))])
    _check_every_route_has_a_token(app)
    return app


def _check_every_route_has_a_token(app: FastAPI) -> None:
    """A route added outside the routers would be open: refuse to start instead."""
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path not in OPEN and not any(
                isinstance(d.dependency, (BearerToken, WorkerToken)) for d in route.dependencies):
            raise RuntimeError(f"route {route.path} is behind no token: add it to a router")


def tune_gc_for_serving() -> None:
    """Freeze what start-up built and collect the young generation every 10,000 allocations
    instead of 700. Each worker request allocates many short-lived objects (its parsed body, a
    batch's row models); with hundreds of requests in flight many outlive a young collection and
    are promoted, so CPython's default thresholds ran older-generation collections that walked
    the whole heap, the app's start-up objects (FastAPI, pydantic schemas, modules) included, ever
    more often as workers were added. bench/controlplane.py, K=256, batch 100: 28,800 ->
    38,500 rows/s, service CPU 0.036 -> 0.026 s per 1,000 rows; K=16 to 256 no longer falls.
    Called by `pcm serve` once the app is built."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
