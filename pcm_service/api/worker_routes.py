"""Routes for workers: behind the pool token, what a glidein needs before it is a worker
(register, the executor, the environment, manifests, the origin's chunks); behind the worker's
own credential, everything under ``/workers/{worker_id}/`` (heartbeat, lease, report, fetch,
engine events, idle, retire), so a glidein host can act only for the workers it registered."""
from __future__ import annotations

import asyncio
from typing import Annotated, Any, Callable, Optional, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from pcm_service.api.auth import BearerToken, WorkerToken
from pcm_service.api.changes import Changes
from pcm_service.api.committer import GroupCommitter
from pcm_service.api.errors import AUTH, BODY, WORKER, ApiError, StrictJSONRoute, errors
from pcm_service.api.metrics import ServiceMetrics
from pcm_service.core import ServiceCore
from pcm_service.core.trust import check_blob_url
from pcm_service.executors import Executor
from pcm_service.protocol import (
    API_PREFIX,
    EXECUTOR_PATH,
    BatchReport,
    BatchReports,
    BootstrapFetchRequest,
    ErrorCode,
    ExecutorInfo,
    FetchPlan,
    FetchRequest,
    Heartbeat,
    HeartbeatResponse,
    IdleReport,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    ModelManifest,
    RegisterResponse,
    ReportResponse,
    RetireDecision,
    WorkerEnvironment,
    WorkerRegistration,
)
from pcm_service.weights.chunks import CHUNK_RE, read_pieces
from pcm_service.weights.ranges import RangeNotSatisfiable, byte_range

R = TypeVar("R", bound=FetchRequest)
# a bootstrapping glidein's name in transfer plans: never a worker id
Receiver = Annotated[str, Path(pattern=r"^boot-[A-Za-z0-9._-]{1,120}$")]
BYTES: dict[str, Any] = {"content": {"application/octet-stream": {}}}


def as_json(model: BaseModel) -> Response:
    """The answer of a hot route, serialised once (FastAPI would dump, validate and dump again
    what the route returns; ``response_model`` still documents it)."""
    return Response(model.model_dump_json(), media_type="application/json")


async def long_poll(changes: Changes, plan_for: Callable[[R], FetchPlan], req: R) -> FetchPlan:
    """A transfer plan; with ``wait`` it long-polls until a source frees up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + req.wait
    while True:
        ev = changes.event
        try:
            plan = await run_in_threadpool(plan_for, req)
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


def worker_router(core: ServiceCore, changes: Changes, executor: Executor, committer: GroupCommitter,
                  metrics: ServiceMetrics, pool: BearerToken) -> APIRouter:
    """Both routers, each behind its credential."""
    router = APIRouter()
    router.include_router(glidein_routes(core, changes, executor), dependencies=[Depends(pool)])
    router.include_router(own_routes(core, changes, committer, metrics), dependencies=[Depends(WorkerToken(core))])
    return router


def glidein_routes(core: ServiceCore, changes: Changes, executor: Executor) -> APIRouter:
    """Behind the pool token: what any glidein of the pool may ask."""
    router = APIRouter(route_class=StrictJSONRoute)

    @router.get(EXECUTOR_PATH, responses=AUTH)
    def executor_info() -> ExecutorInfo:
        """Asked first by every glidein: run a PCM agent, or a vine_worker against this manager."""
        return executor.info()

    @router.get(f"{API_PREFIX}/models/{{digest}}", responses={**AUTH, **errors(404, 422)})
    def manifest(digest: str) -> ModelManifest:
        try:
            return core.replicas.manifest(digest)
        except KeyError:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"unknown model manifest {digest}") from None

    @router.get(f"{API_PREFIX}/blobs/{{chunk}}", response_class=StreamingResponse,
             responses={200: {**BYTES, "description": "The chunk"}, 206: {**BYTES, "description": "Part of it"},
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
        try:
            pieces = read_pieces(path, offset + span.start, span.end - span.start, core.replicas.origin_limiter)
        except OSError as e:  # not the file registered (swapped for a link, replaced): never served
            raise ApiError(404, ErrorCode.NOT_FOUND, f"chunk {chunk}: {e}") from None
        return StreamingResponse(pieces, status_code=span.status, headers=span.headers,
                                 media_type="application/octet-stream")

    @router.post(f"{API_PREFIX}/workers", status_code=201, responses={**BODY, **errors(400, 409)})
    def register(reg: WorkerRegistration, request: Request) -> RegisterResponse:
        """A new worker: the answer carries its own credential (``worker_token``) for its routes."""
        return core.register(reg, request.client.host if request.client else "")

    @router.get(f"{API_PREFIX}/environment", responses={**AUTH, **errors(404)})
    def environment() -> WorkerEnvironment:
        """The packed environment glideins bootstrap from (``pcm serve --worker-env``)."""
        if core.replicas.environment is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "this service ships no worker environment:"
                           " start it with --worker-env FILE (made by `pcm env pack`)")
        return core.replicas.environment

    @router.post(f"{API_PREFIX}/bootstrap/{{receiver}}/fetch", responses={**AUTH, **errors(400, 404, 422)})
    async def bootstrap_fetch(receiver: Receiver, req: BootstrapFetchRequest, request: Request) -> FetchPlan:
        """A transfer plan for a glidein fetching the environment (it has no worker id yet)."""
        address = request.client.host if request.client else ""
        if req.blob_url:
            check_blob_url(req.blob_url, address, core.config.trust)
        return await long_poll(changes, lambda r: core.replicas.plan_bootstrap(receiver, r, address), req)

    @router.delete(f"{API_PREFIX}/bootstrap/{{receiver}}", responses={**AUTH, **errors(422)})
    def bootstrap_done(receiver: Receiver) -> dict[str, bool]:
        """The glidein has the environment (or gave up): it no longer fetches nor serves."""
        core.replicas.end_bootstrap(receiver)
        return {"ok": True}

    return router


def own_routes(core: ServiceCore, changes: Changes, committer: GroupCommitter, metrics: ServiceMetrics) -> APIRouter:
    """Behind the worker's own credential (WorkerToken): a worker acting for itself."""
    router = APIRouter(route_class=StrictJSONRoute)
    # the routes every worker calls all the time: group-committed on one thread
    hot = committer.call

    @router.post(f"{API_PREFIX}/workers/{{worker_id}}/heartbeat", response_model=HeartbeatResponse,
                 responses=WORKER)
    async def heartbeat(worker_id: str, hb: Heartbeat) -> Response:
        return as_json(await hot(core.heartbeat, worker_id, hb))

    @router.post(f"{API_PREFIX}/workers/{{worker_id}}/library", responses=WORKER)
    def library(worker_id: str, ev: LibraryEvent) -> dict[str, bool]:
        core.library_event(worker_id, ev, True)
        return {"ok": True}

    @router.post(f"{API_PREFIX}/workers/{{worker_id}}/lease", response_model=LeaseResponse, responses=WORKER)
    async def lease(worker_id: str, req: LeaseRequest) -> Response:
        with metrics.lease_seconds.time():
            return as_json(await hot(core.lease_batch, worker_id, req))

    @router.post(f"{API_PREFIX}/workers/{{worker_id}}/idle", responses=WORKER)
    def idle(worker_id: str, rep: IdleReport) -> RetireDecision:
        """An idle worker asks to retire; the factory's minimum may keep it."""
        return core.idle(worker_id, rep)

    @router.post(f"{API_PREFIX}/workers/{{worker_id}}/report", responses=WORKER)
    def report(worker_id: str, rep: BatchReport) -> ReportResponse:
        with metrics.report_seconds.time():
            return core.report(worker_id, rep)

    @router.post(f"{API_PREFIX}/workers/{{worker_id}}/reports", response_model=ReportResponse, responses=WORKER)
    async def reports(worker_id: str, reps: BatchReports) -> Response:
        """Several batches' reports, recorded in one transaction."""
        with metrics.report_seconds.time():
            return as_json(await hot(core.report, worker_id, *reps.reports))

    @router.post(f"{API_PREFIX}/workers/{{worker_id}}/fetch", responses=WORKER)
    async def fetch(worker_id: str, req: FetchRequest) -> FetchPlan:
        """A transfer plan for a model's weights."""
        return await long_poll(changes, lambda r: core.fetch_plan(worker_id, r), req)

    @router.delete(f"{API_PREFIX}/workers/{{worker_id}}", responses={**AUTH, **errors(404, 422)})
    def retire(worker_id: str) -> dict[str, int]:
        """The worker leaves: its unfinished batches go back to the queue."""
        return {"requeued_batches": core.retire(worker_id)}

    return router
