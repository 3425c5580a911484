"""What every answer says to browsers, and the check that keeps other sites off the page's forms."""
from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcm_service.api.errors import ApiError
from pcm_service.protocol import ErrorCode


class SecurityHeaders:
    """ASGI middleware: every answer carries ``X-Content-Type-Options: nosniff`` (a browser
    never runs a JSON answer as a script or page), and one that sets no ``Cache-Control`` of its
    own gets ``no-store``: answers are live state, prompts and results, for no cache to keep."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def same_site(request: Request) -> None:
    """Refuse a form post from another site's page (a forced login or logout): browsers say
    where a request comes from in ``Sec-Fetch-Site``, and older ones in ``Origin``. A client that
    sends neither (curl, the CLI) is no browser a page could drive."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise ApiError(403, ErrorCode.CROSS_SITE, f"a {site} request: log in from the status page itself")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise ApiError(403, ErrorCode.CROSS_SITE, "a request from another site's page: log in from the"
                                                  " status page itself")
