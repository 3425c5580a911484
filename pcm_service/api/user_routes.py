"""Routes for users, the CLI and the factory (behind the API token): workloads, models,
status, demand, the factory's limits and reports."""
from __future__ import annotations

from typing import Iterable, Optional

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from pcm_service.api.errors import AUTH, BODY, ApiError, StrictJSONRoute, api_error, errors
from pcm_service.api.ingest import body_chunks, parse_submission
from pcm_service.core import ServiceCore, UnknownModel, UnknownWorkload
from pcm_service.executors import Executor
from pcm_service.protocol import (
    API_PREFIX,
    NDJSON,
    Demand,
    ErrorCode,
    FactoryLimits,
    FactoryReport,
    FactoryView,
    ModelManifest,
    ModelRegistration,
    NamedModel,
    RowIn,
    RunHistory,
    ServiceStatus,
    SubmitResponse,
    WorkloadHeader,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.weights.modelpaths import ModelUnavailable

SUBMIT_PATH = f"{API_PREFIX}/workloads"
# NDJSON: the WorkloadHeader, then one RowIn per line (not under /workloads/: {workload_id} is there)
STREAM_PATH = f"{API_PREFIX}/workload-streams"
NDJSON_BODY = {"requestBody": {"required": True, "description": "line 1: a WorkloadHeader; then one RowIn per line",
                               "content": {NDJSON: {"schema": {"type": "string"}}}}}
SERVED_MODELS_PATH = f"{API_PREFIX}/served-models"  # models by name (OpenAI's view: GET /v1/models)


def _stored(core: ServiceCore, sub: WorkloadHeader, rows: Optional[Iterable[RowIn]] = None) -> SubmitResponse:
    """Store a submission; its model, named in the body, is the request's fault if refused (400)."""
    try:
        return core.submit(sub, rows)
    except (UnknownModel, ModelUnavailable) as e:
        raise api_error(e, "model" if sub.model is not None else "context.model", named_in_body=True) from None


def user_router(core: ServiceCore, executor: Executor) -> APIRouter:
    router = APIRouter(route_class=StrictJSONRoute)

    @router.post(SUBMIT_PATH, status_code=201, responses={**BODY, **errors(400)})
    async def submit(sub: WorkloadSubmission) -> SubmitResponse:
        return await run_in_threadpool(_stored, core, sub)

    @router.post(STREAM_PATH, status_code=201, responses={**BODY, **errors(400, 415)}, openapi_extra=NDJSON_BODY)
    async def submit_stream(request: Request) -> SubmitResponse:
        """A workload whose rows stream in: stored as they arrive, acknowledged once all are."""
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media != NDJSON:
            raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                           f"send the workload as {NDJSON} (got {media or 'no content type'})")
        stream = request.stream()

        def ingest() -> SubmitResponse:  # a bad line raises IngestError: 400 naming it
            header, rows = parse_submission(body_chunks(stream), core.config.max_request_bytes)
            return _stored(core, header, rows)

        return await run_in_threadpool(ingest)

    @router.post(SERVED_MODELS_PATH, status_code=201, responses={**BODY, **errors(400)})
    async def add_served_model(model: NamedModel) -> NamedModel:
        return await run_in_threadpool(core.add_model, model)  # a refused path: 400 naming "path"

    @router.get(SERVED_MODELS_PATH, responses=AUTH)
    def served_models() -> list[NamedModel]:
        return core.list_models()

    @router.post(f"{API_PREFIX}/models", status_code=201, responses={**BODY, **errors(400)})
    async def register_model(reg: ModelRegistration) -> ModelManifest:
        return await run_in_threadpool(core.replicas.register_model, reg.path)

    @router.get(f"{API_PREFIX}/workloads/{{workload_id}}", responses={**AUTH, **errors(404, 422)})
    def workload(workload_id: str) -> WorkloadStatus:
        return core.workload_status(workload_id)  # unknown: 404

    @router.get(f"{API_PREFIX}/history", responses={**AUTH, **errors(404, 422)})
    def history(workload_id: Optional[str] = None) -> RunHistory:
        """The run over time (worker states, engine starts, rows done, bytes moved): `pcm report`."""
        try:
            return core.history(workload_id)
        except UnknownWorkload as e:
            raise api_error(e, "workload_id") from None

    @router.get(f"{API_PREFIX}/status", responses={**AUTH, **errors(422)})
    def status(all: bool = False) -> ServiceStatus:
        return core.status(include_gone=all).model_copy(update={"executor": executor.status()})

    @router.get(f"{API_PREFIX}/demand", responses=AUTH)
    def demand() -> Demand:
        return core.demand()

    @router.get(f"{API_PREFIX}/factory/limits", responses=AUTH)
    def get_limits() -> FactoryLimits:
        return core.factory_limits()

    @router.put(f"{API_PREFIX}/factory/limits", responses={**BODY, **errors(400)})
    def set_limits(limits: FactoryLimits, from_config: bool = False) -> FactoryLimits:
        return core.set_factory_limits(limits, from_config)

    @router.get(f"{API_PREFIX}/factory", responses=AUTH)
    def factory_view() -> FactoryView:
        return core.factory_view()

    @router.post(f"{API_PREFIX}/factory/report", responses=BODY)
    def factory_report(rep: FactoryReport) -> dict[str, bool]:
        core.factory_report(rep)
        return {"ok": True}

    return router
