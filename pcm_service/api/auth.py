"""The bearer tokens as route dependencies. A router is included behind one of them, and the
OpenAPI document names the scheme each operation takes (PoolToken, WorkerToken or ApiToken)."""
from __future__ import annotations

from typing import Optional

from fastapi import Request
from fastapi.security import HTTPBearer

from pcm_service.api.errors import ApiError, api_error
from pcm_service.core import ServiceCore, UnknownWorker
from pcm_service.protocol import ErrorCode
from pcm_service.tokens import check_bearer


class BearerToken(HTTPBearer):
    """The request must carry ``Authorization: Bearer <token>``: 401 without one, 403 with another."""

    def __init__(self, token: str, what: str, scheme_name: str, description: str) -> None:
        if not token:
            raise ValueError(f"no {what}")
        super().__init__(auto_error=False, scheme_name=scheme_name, description=description)
        self.token, self.what = token, what

    async def __call__(self, request: Request) -> None:
        refused = check_bearer(request.headers.get("authorization"), self.token, self.what)
        if refused is not None:
            status, why = refused
            raise ApiError(status, ErrorCode.MISSING_TOKEN if status == 401 else ErrorCode.WRONG_TOKEN, why,
                           headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def pool_token(token: str) -> BearerToken:
    return BearerToken(token, "pool token", "PoolToken", "The pool token: workers (glideins) and their chunk fetches")


def api_token(token: str) -> BearerToken:
    return BearerToken(token, "API token", "ApiToken", "The API token: users, the CLI and the factory")


class ReadToken(BearerToken):
    """``GET /metrics``: the read-only metrics token (what Prometheus is given) or the API token."""

    def __init__(self, metrics: Optional[str], api: str) -> None:
        super().__init__(api, "metrics token or API token", "MetricsToken",
                         "The metrics token (read-only: /metrics) or the API token")
        self.metrics = metrics

    async def __call__(self, request: Request) -> None:
        if self.metrics and check_bearer(request.headers.get("authorization"), self.metrics) is None:
            return
        await super().__call__(request)


class WorkerToken(HTTPBearer):
    """``/workers/{worker_id}/...``: that worker's own credential (from its registration), never
    the pool token nor another worker's: 401 without one, 404 for an id never registered, 403
    (``wrong_worker``) for any other token. A glidein host can act only for its own workers."""

    def __init__(self, core: ServiceCore) -> None:
        super().__init__(auto_error=False, scheme_name="WorkerToken",
                         description="A worker's own credential: the worker_token its registration returned")
        self.core = core

    async def __call__(self, request: Request) -> None:
        worker_id = str(request.path_params.get("worker_id", ""))
        authorization = request.headers.get("authorization") or ""
        if not authorization.startswith("Bearer "):
            raise ApiError(401, ErrorCode.MISSING_TOKEN, "missing worker token: send 'Authorization: Bearer"
                           " <worker_token>' (from the registration)", headers={"WWW-Authenticate": "Bearer"})
        matches = self.core.worker_token_matches(worker_id, authorization[7:].strip())
        if matches is None:
            raise api_error(UnknownWorker(worker_id))  # the table's answer, as the routes give it
        if not matches:
            raise ApiError(403, ErrorCode.WRONG_WORKER, f"not the credential of worker {worker_id}")
