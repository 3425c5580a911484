"""HTTP layer: a thin FastAPI shell over ``ServiceCore``."""
from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import anyio.to_thread
from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse

from pcm_service.core import ServiceCore, UnknownWorker, UnknownWorkload
from pcm_service.httperrors import ApiError, BodyLimit, StrictJSONRoute, errors, install_error_handlers
from pcm_service.protocol import (
    API_PREFIX,
    BatchReport,
    Demand,
    ErrorCode,
    FactoryLimits,
    FactoryReport,
    FactoryView,
    FetchPlan,
    FetchRequest,
    Heartbeat,
    HeartbeatResponse,
    IdleReport,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    ModelManifest,
    ModelRegistration,
    RegisterResponse,
    ReportResponse,
    RetireDecision,
    ServiceStatus,
    SubmitResponse,
    WorkerRegistration,
    WorkerState,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.tokens import check_bearer
from pcm_service.weights.chunks import CHUNK_RE, read_pieces
from pcm_service.weights.modelpaths import ModelUnavailable
from pcm_service.weights.ranges import RangeNotSatisfiable, byte_range

log = logging.getLogger("pcm.service")


def _reaper(core: ServiceCore, stop: threading.Event) -> None:
    while not stop.wait(core.config.heartbeat_interval):
        try:
            for worker_id in core.reap():
                log.warning("worker %s missed heartbeats for %.0fs: lost, its batches requeued",
                            worker_id, core.config.worker_timeout)
        except Exception:  # the reaper must outlive any one bad cycle
            log.exception("reaper cycle failed")


class _Changes:
    """Wakes long-polling fetch requests when a transfer finishes or a source frees up."""

    def __init__(self) -> None:
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.event: Optional[asyncio.Event] = None

    def bind(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def _fire(self) -> None:
        ev, self.event = self.event, asyncio.Event()
        if ev is not None:
            ev.set()

    def notify(self) -> None:  # called from any thread
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fire)


def _needs_pool_token(method: str, path: str) -> bool:
    """Worker routes (what glideins call) take the pool token; every other route the API token."""
    return (path.startswith((f"{API_PREFIX}/workers", f"{API_PREFIX}/blobs/"))
            or (method == "GET" and path.startswith(f"{API_PREFIX}/models/")))


SECURITY_SCHEMES = {
    "PoolToken": {"type": "http", "scheme": "bearer",
                  "description": "The pool token: workers (glideins) and their chunk fetches"},
    "ApiToken": {"type": "http", "scheme": "bearer",
                 "description": "The API token: users, the CLI and the factory"},
}
AUTH = errors(401, 403)
BODY = errors(401, 403, 413, 422)  # routes that take a request body (or query parameters)
WORKER = {**BODY, **errors(404, 410)}  # a worker route: the worker may be unknown, lost or retired


def _unknown_worker(e: UnknownWorker) -> ApiError:
    if e.state == WorkerState.RETIRED:
        return ApiError(410, ErrorCode.WORKER_RETIRED, f"worker {e.worker_id} has retired; it may not come back")
    if e.state == WorkerState.LOST:
        return ApiError(404, ErrorCode.WORKER_LOST, f"worker {e.worker_id} was declared lost; register again")
    return ApiError(404, ErrorCode.WORKER_UNKNOWN, f"unknown worker {e.worker_id}; register again")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus which bearer token each operation takes (from the same rule
    the app enforces, so the document cannot disagree with it)."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        doc.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if path != "/healthz":
                    op["security"] = [{"PoolToken" if _needs_pool_token(method.upper(), path) else "ApiToken": []}]
        app.openapi_schema = doc
    return app.openapi_schema


def create_app(core: ServiceCore, pool_token: str, api_token: str) -> FastAPI:
    """Every route but /healthz needs a bearer token: the pool token on worker routes, the API
    token on the others (by path, so a new route is never open by mistake); never interchangeable."""
    if not pool_token or not api_token:
        raise ValueError("create_app needs both the pool token and the API token")

    def auth(request: Request) -> None:
        path = getattr(request.scope.get("route"), "path", request.url.path)
        if path == "/healthz":
            return
        pool = _needs_pool_token(request.method, path)
        refused = check_bearer(request.headers.get("authorization"), pool_token if pool else api_token,
                               "pool token" if pool else "API token")
        if refused is not None:
            status, why = refused
            raise ApiError(status, ErrorCode.MISSING_TOKEN if status == 401 else ErrorCode.WRONG_TOKEN, why,
                           headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    stop = threading.Event()
    changes = _Changes()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        t = threading.Thread(target=_reaper, args=(core, stop), name="pcm-reaper", daemon=True)
        t.start()
        changes.bind()
        core.replicas.on_change = changes.notify
        # chunk streams and plan requests run in threads: leave room for a large pool
        anyio.to_thread.current_default_thread_limiter().total_tokens = 200
        yield
        stop.set()
        t.join(timeout=5)

    app = FastAPI(title="PCM service", version="1", lifespan=lifespan, dependencies=[Depends(auth)])
    app.router.route_class = StrictJSONRoute
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    submit_path = f"{API_PREFIX}/workloads"
    cfg = core.config
    app.add_middleware(BodyLimit, limit_for=lambda path: cfg.max_submission_bytes if path == submit_path
                       else cfg.max_request_bytes)
    app.state.core = core

    def worker_call(fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except UnknownWorker as e:
            raise _unknown_worker(e) from None

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(submit_path, status_code=201, responses={**BODY, **errors(400)})
    async def submit(sub: WorkloadSubmission) -> SubmitResponse:
        try:
            return await run_in_threadpool(core.submit, sub)
        except ModelUnavailable as e:
            raise ApiError(400, ErrorCode.MODEL_UNAVAILABLE, f"context.model: {e}", "context.model") from None

    @app.post(f"{API_PREFIX}/models", status_code=201, responses={**BODY, **errors(400)})
    async def register_model(reg: ModelRegistration) -> ModelManifest:
        try:
            return await run_in_threadpool(core.replicas.register_model, reg.path)
        except ModelUnavailable as e:
            raise ApiError(400, ErrorCode.MODEL_UNAVAILABLE, f"path: {e}", "path") from None

    @app.get(f"{API_PREFIX}/models/{{digest}}", responses={**AUTH, **errors(404, 422)})
    def manifest(digest: str) -> ModelManifest:
        try:
            return core.replicas.manifest(digest)
        except KeyError:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"unknown model manifest {digest}") from None

    @app.get(f"{API_PREFIX}/blobs/{{chunk}}", response_class=StreamingResponse,
             responses={200: {"content": {"application/octet-stream": {}}, "description": "The chunk"},
                        206: {"content": {"application/octet-stream": {}}, "description": "Part of it"},
                        **AUTH, **errors(404, 416, 422)})
    def origin_chunk(chunk: str, range: Optional[str] = Header(None)) -> StreamingResponse:
        """The origin copy of a chunk, paced by the origin's upload rate."""
        loc = core.replicas.origin_location(chunk) if CHUNK_RE.fullmatch(chunk) else None
        if loc is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no chunk {chunk} in any registered model")
        path, offset, length = loc
        try:
            span = byte_range(range, length)
        except RangeNotSatisfiable as e:
            raise ApiError(416, ErrorCode.RANGE_NOT_SATISFIABLE, str(e), "range", headers=e.headers) from None
        pieces = read_pieces(path, offset + span.start, span.end - span.start, core.replicas.origin_limiter)
        return StreamingResponse(pieces, status_code=span.status, headers=span.headers,
                                 media_type="application/octet-stream")

    @app.get(f"{API_PREFIX}/workloads/{{workload_id}}", responses={**AUTH, **errors(404, 422)})
    def workload(workload_id: str) -> WorkloadStatus:
        try:
            return core.workload_status(workload_id)
        except UnknownWorkload:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"unknown workload {workload_id}") from None

    @app.get(f"{API_PREFIX}/status", responses={**AUTH, **errors(422)})
    def status(all: bool = False) -> ServiceStatus:
        return core.status(include_gone=all)

    @app.get(f"{API_PREFIX}/demand", responses=AUTH)
    def demand() -> Demand:
        return core.demand()

    @app.get(f"{API_PREFIX}/factory/limits", responses=AUTH)
    def get_limits() -> FactoryLimits:
        return core.factory_limits()

    @app.put(f"{API_PREFIX}/factory/limits", responses={**BODY, **errors(400)})
    def set_limits(limits: FactoryLimits, from_config: bool = False) -> FactoryLimits:
        return core.set_factory_limits(limits, from_config)

    @app.get(f"{API_PREFIX}/factory", responses=AUTH)
    def factory_view() -> FactoryView:
        return core.factory_view()

    @app.post(f"{API_PREFIX}/factory/report", responses=BODY)
    def factory_report(rep: FactoryReport) -> dict[str, bool]:
        core.factory_report(rep)
        return {"ok": True}

    @app.post(f"{API_PREFIX}/workers", status_code=201, responses=BODY)
    def register(reg: WorkerRegistration) -> RegisterResponse:
        return core.register(reg)

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/heartbeat", responses=WORKER)
    def heartbeat(worker_id: str, hb: Heartbeat) -> HeartbeatResponse:
        return worker_call(core.heartbeat, worker_id, hb)

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/library", responses=WORKER)
    def library(worker_id: str, ev: LibraryEvent) -> dict[str, bool]:
        worker_call(core.library_event, worker_id, ev)
        return {"ok": True}

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/lease", responses=WORKER)
    def lease(worker_id: str, req: LeaseRequest) -> LeaseResponse:
        return worker_call(core.lease_batch, worker_id, req)

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/idle", responses=WORKER)
    def idle(worker_id: str, rep: IdleReport) -> RetireDecision:
        """An idle worker asks to retire; the factory's minimum may keep it."""
        return worker_call(core.idle, worker_id, rep)

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/report", responses=WORKER)
    def report(worker_id: str, rep: BatchReport) -> ReportResponse:
        try:
            return core.report(worker_id, rep)
        except UnknownWorker as e:
            raise _unknown_worker(e) from None
        except LookupError as e:
            raise ApiError(404, ErrorCode.NOT_FOUND, str(e), "batch_id") from None

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/fetch", responses=WORKER)
    async def fetch(worker_id: str, req: FetchRequest) -> FetchPlan:
        """A transfer plan; with ``wait`` it long-polls until a source frees up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.wait
        while True:
            ev = changes.event
            try:
                plan = await run_in_threadpool(worker_call, core.fetch_plan, worker_id, req)
            except KeyError:
                raise ApiError(404, ErrorCode.NOT_FOUND, f"unknown model manifest {req.manifest_digest}",
                               "manifest_digest") from None
            left = deadline - loop.time()
            done = plan.progress.chunks_held == plan.progress.chunks_total
            if plan.assignments or req.want == 0 or done or left <= 0 or ev is None:
                return plan
            req = req.model_copy(update={"results": []})  # recorded once
            try:
                await asyncio.wait_for(ev.wait(), left)
            except asyncio.TimeoutError:
                pass

    @app.delete(f"{API_PREFIX}/workers/{{worker_id}}", responses={**AUTH, **errors(422)})
    def retire(worker_id: str) -> dict[str, int]:
        return {"requeued_batches": core.retire(worker_id)}

    return app
