"""The HTTP edges of the service: one error body for every refusal, documented statuses,
``OPTIONS``/405 with ``Allow``, request-size limits (413) and strict JSON."""
from __future__ import annotations

import json
from typing import Any, Callable, Coroutine, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic_core import from_json
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcm_service.api.ingest import IngestError
from pcm_service.core import (
    Conflict,
    CoreError,
    NoChatTemplate,
    OutputRefused,
    Refused,
    UnknownBatch,
    UnknownModel,
    UnknownObject,
    UnknownWorker,
    UnknownWorkload,
)
from pcm_service.protocol import API_PREFIX, CODE_OF_STATUS, ErrorBody, ErrorCode, ErrorItem, WorkerState
from pcm_service.weights.modelpaths import ModelUnavailable

_DESCRIPTIONS = {
    400: "The request is well formed but cannot be carried out (e.g. a refused model path)",
    401: "No bearer token (send `Authorization: Bearer <token>`)",
    403: "A wrong token, or the other kind of token",
    404: "No such object",
    409: "Conflicts with the current state",
    410: "Gone for good (a retired worker)",
    413: "The request body is larger than the service accepts",
    415: "The body is not in the media type the route takes",
    416: "The Range cannot be served",
    422: "The request does not match the schema (every field at fault is listed)",
    503: "Busy: try again or elsewhere",
}


def errors(*statuses: int, shape: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the ErrorBody shape (or ``shape``)."""
    return {s: {"model": shape, "description": _DESCRIPTIONS[s]} for s in statuses}


class ApiError(HTTPException):
    """An error answer with its machine-readable code and, if one is at fault, the field."""

    def __init__(self, status: int, code: ErrorCode, detail: str, field: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(status, detail, headers)
        self.code = code
        self.field = field


AUTH = errors(401, 403)
BODY = errors(401, 403, 413, 422)  # routes that take a request body (or query parameters)
WORKER = {**BODY, **errors(404, 409, 410)}  # a worker route: unknown, lost or retired; 409: not its own


# a worker's call that is not its to make (core.Refused), by the rule it broke
REFUSED_STATUS = {ErrorCode.WRONG_WORKER: 403, ErrorCode.BATCH_NOT_LEASED: 409,
                  ErrorCode.CONTEXT_NOT_ASSIGNED: 409, ErrorCode.PEER_ADDRESS: 400,
                  ErrorCode.TOO_MANY_WORKERS: 409}
# what the table answers: the core's own errors, a model path the policy refuses, a bad NDJSON line
ANSWERED: tuple[type[Exception], ...] = (CoreError, ModelUnavailable, IngestError)


def api_error(e: Exception, field: Optional[str] = None, named_in_body: bool = False) -> ApiError:
    """The one table from an error of the core to its HTTP answer: status, code, wording, the
    field at fault. Routes let these errors propagate (``install_error_handlers`` answers them)
    and catch one only to say which request ``field`` named what is at fault; an unknown object
    ``named_in_body`` (a reference in the request, not the object the URL asks for) is the
    request's fault: 400, not 404."""
    match e:
        case UnknownWorker(state=WorkerState.RETIRED):  # it left: it must not come back
            return ApiError(410, ErrorCode.WORKER_RETIRED, f"worker {e.worker_id} has retired; it may not come back")
        case UnknownWorker(state=WorkerState.LOST):
            return ApiError(404, ErrorCode.WORKER_LOST, f"worker {e.worker_id} was declared lost; register again")
        case UnknownWorker():
            return ApiError(404, ErrorCode.WORKER_UNKNOWN, f"unknown worker {e.worker_id}; register again")
        case Refused():
            return ApiError(REFUSED_STATUS[e.code], e.code, str(e), e.field)
        case UnknownBatch():
            return ApiError(404, ErrorCode.NOT_FOUND, str(e), field or "batch_id")
        case UnknownWorkload():
            return ApiError(404, ErrorCode.NOT_FOUND, f"unknown workload {e.workload_id}", field)
        case UnknownModel() if named_in_body:
            at = field or "model"
            return ApiError(400, ErrorCode.MODEL_NOT_FOUND, f"{at}: no model named {e.name} is registered"
                            " (pcm model list)", at)
        case UnknownModel():  # OpenAI's wording: only GET /v1/models/{model} asks for one by name
            return ApiError(404, ErrorCode.MODEL_NOT_FOUND, f"The model '{e.name}' does not exist", field)
        case UnknownObject():  # OpenAI's Files and Batches; the message is OpenAI's wording
            return ApiError(404, ErrorCode.NOT_FOUND, str(e), field)
        case Conflict():
            return ApiError(409, ErrorCode.CONFLICT, str(e), field)
        case NoChatTemplate():
            return ApiError(400, ErrorCode.NO_CHAT_TEMPLATE, str(e), field or "rows.messages")
        case OutputRefused():  # outside every --output-root, in the state directory, a secret
            return ApiError(400, ErrorCode.INVALID_VALUE, str(e), e.field)
        case ModelUnavailable():  # the model policy refuses the directory
            at = field or "path"
            return ApiError(400, ErrorCode.MODEL_UNAVAILABLE, f"{at}: {e}", at)
        case IngestError():
            return ApiError(400, ErrorCode.INVALID_VALUE, str(e), e.field)
    raise TypeError(f"no HTTP answer for {type(e).__name__}: add it to api_error") from e


def error_response(status: int, body: ErrorBody, headers: Optional[dict[str, str]] = None,
                   path: str = "") -> JSONResponse:
    """PCM's ErrorBody; on OpenAI's routes (``/v1/…`` outside ``/v1/pcm``) OpenAI's error shape."""
    if path.startswith("/v1/") and not path.startswith(API_PREFIX + "/"):
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                409: "conflict_error", 413: "invalid_request_error"}.get(status, "invalid_request_error")
        return JSONResponse({"error": {"message": body.detail, "type": kind, "param": body.field,
                                       "code": body.code.value}}, status_code=status, headers=headers)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    return ".".join(parts[1:] if parts and parts[0] in ("body", "query", "path", "header") else parts)


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "GET"})  # match the path, whatever the method
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods | {"OPTIONS"}) if methods else []


class StrictJSONRequest(Request):
    """Bodies parsed by pydantic's JSON parser: invalid UTF-8, lone surrogates (which could never
    be written back out) and NaN/Infinity are refused (422) like any other malformed JSON."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = from_json(body)
            except ValueError as e:
                raise json.JSONDecodeError(f"not valid JSON ({e})", body.decode("utf-8", "replace"), 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return route


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            allow = ", ".join(_allowed_methods(app, request.scope))
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allow})
            return error_response(405, ErrorBody(code=ErrorCode.METHOD_NOT_ALLOWED,
                                                 detail=f"{request.method} is not allowed here; use {allow}"),
                                  headers={"Allow": allow}, path=request.url.path)
        if isinstance(exc, ApiError):
            body = ErrorBody(code=exc.code, detail=str(exc.detail), field=exc.field)
        elif exc.status_code == 400:  # FastAPI could not read the body: it is not what the schema says
            return error_response(422, ErrorBody(code=ErrorCode.INVALID_REQUEST, detail=f"body: {exc.detail}",
                                                 field="body"), path=request.url.path)
        else:
            code = CODE_OF_STATUS.get(exc.status_code, ErrorCode.INVALID_REQUEST)
            body = ErrorBody(code=code, detail=str(exc.detail))
        return error_response(exc.status_code, body, headers=dict(exc.headers) if exc.headers else None,
                              path=request.url.path)

    async def core_error(request: Request, exc: Exception) -> Response:
        """A core error a route let through: answered from the table."""
        e = api_error(exc)
        return error_response(e.status_code, ErrorBody(code=e.code, detail=str(e.detail), field=e.field),
                              path=request.url.path)

    for kind in ANSWERED:
        app.add_exception_handler(kind, core_error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        """422 when the request breaks the schema; 400 when only our own validators (rules the
        schema cannot state: duplicate ids, max below min) refuse it."""
        errs = exc.errors()
        items = [ErrorItem(field=_loc(tuple(e.get("loc", ()))) or "body",
                           message=str(e.get("msg", "")).removeprefix("Value error, ")) for e in errs]
        detail = "; ".join(f"{i.field}: {i.message}" for i in items) or "invalid request"
        rule = bool(errs) and all(e.get("type") == "value_error" for e in errs)
        return error_response(400 if rule else 422,
                              ErrorBody(code=ErrorCode.INVALID_VALUE if rule else ErrorCode.INVALID_REQUEST,
                                        detail=detail, field=items[0].field if items else None, errors=items),
                              path=request.url.path)


class BodyLimit:
    """ASGI middleware: a request body over ``limit_for(path)`` bytes gets 413, whether it
    says its length up front or streams it."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])

        def too_large() -> ApiError:
            return ApiError(413, ErrorCode.REQUEST_TOO_LARGE,
                            f"the request body is larger than this service accepts here ({limit} bytes)")

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            body = ErrorBody(code=ErrorCode.REQUEST_TOO_LARGE, detail=str(too_large().detail))
            await error_response(413, body, {"Connection": "close"}, scope["path"])(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large()  # inside the route: the error handler answers 413
            return message

        await self.app(scope, limited, send)
