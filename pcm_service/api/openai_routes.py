"""OpenAI's Files, Batches and Models routes (behind the API token), so the official
``openai`` client works with ``base_url=<service>/v1`` and the API token as its key.
Errors answer in OpenAI's shape (``{"error": {message, type, param, code}}``); the core's errors
(an unknown File, Batch or model, a batch not cancellable) are answered by ``api/errors.py``'s table."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Literal, Optional

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from pcm_service.api.errors import ApiError, StrictJSONRoute, errors
from pcm_service.batchapi.objects import (
    BatchCreate,
    BatchErrorItem,
    BatchObject,
    FileDeleted,
    FileObject,
    ListPage,
    ModelObject,
    OpenAIErrorBody,
)
from pcm_service.core import ServiceCore
from pcm_service.protocol import ErrorCode

log = logging.getLogger("pcm.service")
OPENAI_PREFIX = "/v1"
FILES_PATH = f"{OPENAI_PREFIX}/files"
COPY_CHUNK = 1 << 20


def oa_errors(*statuses: int) -> dict[int | str, dict[str, object]]:
    """These routes answer errors in OpenAI's shape; so says their OpenAPI document."""
    return errors(*statuses, shape=OpenAIErrorBody)


AUTH = oa_errors(401, 403)
BODY = oa_errors(401, 403, 413, 422)


def validate_batch(core: ServiceCore, batch_id: str) -> None:
    """Check a new batch's input file (after its create request was answered)."""
    try:
        core.validate_batch(batch_id)
    except Exception as e:  # never leave a batch validating forever
        log.exception("validating batch %s failed", batch_id)
        core.fail_batch(batch_id, [BatchErrorItem(code="server_error", message=f"{type(e).__name__}: {e}")])


def _store_upload(core: ServiceCore, upload: UploadFile, purpose: str) -> FileObject:
    """Copy the spooled upload to the state directory in 1 MiB pieces, fsync, then record it."""
    file_id, path = core.new_file_id()
    try:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as fh:
            shutil.copyfileobj(upload.file, fh, COPY_CHUNK)
            fh.flush()
            os.fsync(fh.fileno())
        return core.add_file(file_id, path, upload.filename or file_id, purpose)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def openai_router(core: ServiceCore) -> APIRouter:
    router = APIRouter(route_class=StrictJSONRoute)

    @router.post(FILES_PATH, responses={**BODY, **oa_errors(400)})
    async def upload_file(request: Request) -> FileObject:
        # starlette spools each file part to disk past 1 MiB: an upload never sits in memory
        async with request.form(max_files=1, max_fields=8) as form:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise ApiError(400, ErrorCode.INVALID_VALUE, f"Invalid value for 'purpose': {purpose!r};"
                               " PCM accepts 'batch'.", "purpose")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, ErrorCode.INVALID_REQUEST, "Missing required parameter: 'file'.", "file")
            if not (upload.filename or "").endswith(".jsonl"):
                raise ApiError(400, ErrorCode.INVALID_FILE_FORMAT,
                               "Invalid file format for Batch API. Must be .jsonl", "file")
            return await run_in_threadpool(_store_upload, core, upload, purpose)

    @router.get(FILES_PATH, responses={**AUTH, **oa_errors(422)})
    def list_files(purpose: Optional[str] = None, after: Optional[str] = None,
                   limit: int = Query(10000, ge=1, le=10000),
                   order: Literal["asc", "desc"] = "desc") -> ListPage[FileObject]:
        files = core.files(purpose)
        if order == "desc":
            files.reverse()
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1:] if after in ids else []
        return ListPage[FileObject].of(files[:limit], has_more=len(files) > limit)

    @router.get(f"{FILES_PATH}/{{file_id}}", responses={**AUTH, **oa_errors(404)})
    def get_file(file_id: str) -> FileObject:
        return core.file(file_id)  # unknown: 404 (api/errors.py answers every core error)

    @router.get(f"{FILES_PATH}/{{file_id}}/content", response_class=FileResponse,
                responses={**AUTH, **oa_errors(404)})
    def file_content(file_id: str) -> FileResponse:
        return FileResponse(core.file_path(file_id), media_type="application/jsonl")

    @router.delete(f"{FILES_PATH}/{{file_id}}", responses={**AUTH, **oa_errors(404)})
    def delete_file(file_id: str) -> FileDeleted:
        core.delete_file(file_id)
        return FileDeleted(id=file_id)

    @router.post(f"{OPENAI_PREFIX}/batches", responses={**BODY, **oa_errors(400)})
    def create_batch(req: BatchCreate, tasks: BackgroundTasks) -> BatchObject:
        problem = req.problem()
        if problem is not None:
            code, param, message = problem
            raise ApiError(400, ErrorCode(code), message, param)
        batch = core.create_batch(req.input_file_id, req.endpoint, req.completion_window, req.metadata)
        tasks.add_task(validate_batch, core, batch.id)
        return batch

    @router.get(f"{OPENAI_PREFIX}/batches", responses={**AUTH, **oa_errors(422)})
    def list_batches(after: Optional[str] = None, limit: int = Query(20, ge=1, le=100)) -> ListPage[BatchObject]:
        page, more = core.batches(after, limit)
        return ListPage[BatchObject].of(page, has_more=more)

    @router.get(f"{OPENAI_PREFIX}/batches/{{batch_id}}", responses={**AUTH, **oa_errors(404)})
    def get_batch(batch_id: str) -> BatchObject:
        return core.batch(batch_id)

    @router.post(f"{OPENAI_PREFIX}/batches/{{batch_id}}/cancel", responses={**AUTH, **oa_errors(404, 409)})
    def cancel_batch(batch_id: str) -> BatchObject:
        return core.cancel_batch(batch_id)  # unknown: 404; not cancellable in its state: 409

    @router.get(f"{OPENAI_PREFIX}/models", responses=AUTH)
    def list_models() -> ListPage[ModelObject]:
        return ListPage[ModelObject].of([ModelObject(id=m.name, created=int(m.created or 0))
                                         for m in core.list_models()])

    @router.get(f"{OPENAI_PREFIX}/models/{{model:path}}", responses={**AUTH, **oa_errors(404)})
    def get_model(model: str) -> ModelObject:
        m = core.named_model(model)
        return ModelObject(id=m.name, created=int(m.created or 0))

    return router
