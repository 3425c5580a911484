"""The status page: ``GET /`` serves a static page (no data in it) whose script reads
``/ui/status`` every few seconds. Logging in with the API token (``POST /ui/login``) sets a
session cookie (HttpOnly, SameSite=Strict; Secure over HTTPS) that reads ``/ui/status`` and
nothing else; its value is derived from the API token, never the token itself, and changes
when the token does. Login and logout refuse posts from other sites' pages (``same_site``)."""
from __future__ import annotations

import hashlib
import hmac
from importlib.resources import files

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse

from pcm_service.api.auth import BearerToken
from pcm_service.api.errors import AUTH, ApiError, errors
from pcm_service.api.headers import same_site
from pcm_service.core import ServiceCore
from pcm_service.executors import Executor
from pcm_service.protocol import ErrorCode, ServiceStatus

SESSION_COOKIE = "pcm_session"
PAGE_PATH, LOGIN_PATH, LOGOUT_PATH, DATA_PATH = "/", "/ui/login", "/ui/logout", "/ui/status"


def session_value(api_token: str) -> str:
    return hmac.new(api_token.encode(), b"pcm status page session v1", hashlib.sha256).hexdigest()


class PageToken(BearerToken):
    """The page's data: the session cookie of a login, or the API token as a bearer token."""

    def __init__(self, api: str) -> None:
        super().__init__(api, "API token", "ApiToken", "The API token: users, the CLI and the factory")
        self.session = session_value(api)

    async def __call__(self, request: Request) -> None:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and hmac.compare_digest(cookie.encode(), self.session.encode()):
            return
        await super().__call__(request)


def page_routers(core: ServiceCore, executor: Executor, api: str) -> tuple[APIRouter, APIRouter]:
    """(the open routes: the page, login, logout; the data route, to include behind PageToken)."""
    page = (files("pcm_service.api") / "static" / "status.html").read_text(encoding="utf-8")
    session = session_value(api)
    open_, data = APIRouter(), APIRouter()

    @open_.get(PAGE_PATH, response_class=HTMLResponse, include_in_schema=False)
    def status_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                           "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline';"
                                           " style-src 'unsafe-inline'; frame-ancestors 'none'"})

    @open_.post(LOGIN_PATH, status_code=204, responses=errors(403, 422), dependencies=[Depends(same_site)])
    def login(request: Request, token: str = Form(..., min_length=1, description="The API token")) -> Response:
        """Log the status page in: a session cookie that reads the page's data."""
        if not hmac.compare_digest(token.strip().encode(), api.encode()):
            raise ApiError(403, ErrorCode.WRONG_TOKEN, "wrong API token", "token")
        resp = Response(status_code=204)
        resp.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/ui/")
        return resp

    @open_.post(LOGOUT_PATH, status_code=204, responses=errors(403), dependencies=[Depends(same_site)])
    def logout() -> Response:
        resp = Response(status_code=204)
        resp.delete_cookie(SESSION_COOKIE, path="/ui/")
        return resp

    @data.get(DATA_PATH, responses=AUTH)
    def page_status() -> ServiceStatus:
        """What `pcm status` shows, for the status page."""
        return core.status().model_copy(update={"executor": executor.status()})

    return open_, data
