"""HTTP layer: a thin FastAPI shell over ``ServiceCore``."""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool

from pcm_service.core import ServiceCore, UnknownWorker, UnknownWorkload
from pcm_service.protocol import (
    API_PREFIX,
    BatchReport,
    Demand,
    FactoryLimits,
    FactoryReport,
    FactoryView,
    Heartbeat,
    HeartbeatResponse,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RegisterResponse,
    ReportResponse,
    ServiceStatus,
    SubmitResponse,
    WorkerRegistration,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.tokens import bearer_checker

log = logging.getLogger("pcm.service")


def _reaper(core: ServiceCore, stop: threading.Event) -> None:
    while not stop.wait(core.config.heartbeat_interval):
        try:
            for worker_id in core.reap():
                log.warning("worker %s missed heartbeats for %.0fs: lost, its batches requeued",
                            worker_id, core.config.worker_timeout)
        except Exception:  # the reaper must outlive any one bad cycle
            log.exception("reaper cycle failed")


def create_app(core: ServiceCore, pool_token: Optional[str] = None) -> FastAPI:
    """``pool_token``: when set, the worker routes require it as a bearer token."""
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        t = threading.Thread(target=_reaper, args=(core, stop), name="pcm-reaper", daemon=True)
        t.start()
        yield
        stop.set()
        t.join(timeout=5)

    app = FastAPI(title="PCM service", lifespan=lifespan)
    worker_auth = [Depends(bearer_checker(pool_token))]
    app.state.core = core

    def worker_call(fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except UnknownWorker as e:
            raise HTTPException(404, f"unknown or retired worker {e}; register again") from None

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(f"{API_PREFIX}/workloads", status_code=201)
    async def submit(sub: WorkloadSubmission) -> SubmitResponse:
        return await run_in_threadpool(core.submit, sub)

    @app.get(f"{API_PREFIX}/workloads/{{workload_id}}")
    def workload(workload_id: str) -> WorkloadStatus:
        try:
            return core.workload_status(workload_id)
        except UnknownWorkload:
            raise HTTPException(404, f"unknown workload {workload_id}") from None

    @app.get(f"{API_PREFIX}/status")
    def status(all: bool = False) -> ServiceStatus:
        return core.status(include_gone=all)

    @app.get(f"{API_PREFIX}/demand")
    def demand() -> Demand:
        return core.demand()

    @app.get(f"{API_PREFIX}/factory/limits")
    def get_limits() -> FactoryLimits:
        return core.factory_limits()

    @app.put(f"{API_PREFIX}/factory/limits")
    def set_limits(limits: FactoryLimits, from_config: bool = False) -> FactoryLimits:
        return core.set_factory_limits(limits, from_config)

    @app.get(f"{API_PREFIX}/factory")
    def factory_view() -> FactoryView:
        return core.factory_view()

    @app.post(f"{API_PREFIX}/factory/report")
    def factory_report(rep: FactoryReport) -> dict[str, bool]:
        core.factory_report(rep)
        return {"ok": True}

    @app.post(f"{API_PREFIX}/workers", status_code=201, dependencies=worker_auth)
    def register(reg: WorkerRegistration) -> RegisterResponse:
        return core.register(reg)

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/heartbeat", dependencies=worker_auth)
    def heartbeat(worker_id: str, hb: Heartbeat) -> HeartbeatResponse:
        return worker_call(core.heartbeat, worker_id, hb)

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/library", dependencies=worker_auth)
    def library(worker_id: str, ev: LibraryEvent) -> dict[str, bool]:
        worker_call(core.library_event, worker_id, ev)
        return {"ok": True}

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/lease", dependencies=worker_auth)
    def lease(worker_id: str, req: LeaseRequest) -> LeaseResponse:
        return worker_call(core.lease_batch, worker_id, req)

    @app.post(f"{API_PREFIX}/workers/{{worker_id}}/report", dependencies=worker_auth)
    def report(worker_id: str, rep: BatchReport) -> ReportResponse:
        try:
            return core.report(worker_id, rep)
        except LookupError as e:
            raise HTTPException(404, str(e)) from None

    @app.delete(f"{API_PREFIX}/workers/{{worker_id}}", dependencies=worker_auth)
    def retire(worker_id: str) -> dict[str, int]:
        return {"requeued_batches": core.retire(worker_id)}

    return app
