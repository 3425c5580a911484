"""HTTP client for the service, used by the CLI, the worker agent and the factory."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import httpx
from pydantic import BaseModel

from pcm_service.protocol import API_PREFIX, NDJSON, RowIn, SubmitResponse, WorkloadHeader
from pcm_service.tls import CA_FILE_ENV, client_context, is_tls_failure, tls_hint

DEFAULT_SERVICE_URL = "http://127.0.0.1:8642"
T = TypeVar("T", bound=BaseModel)
STREAM_ROWS = 1000  # rows per piece of a streamed submission


def default_service_url() -> str:
    return os.environ.get("PCM_SERVICE_URL", DEFAULT_SERVICE_URL)


def default_ca_file() -> Optional[str]:
    return os.environ.get(CA_FILE_ENV) or None


class ServiceError(RuntimeError):
    """An error answer (``status``, the service's ``code`` and message), or 0 for no answer."""

    def __init__(self, status: int, detail: str, code: Optional[str] = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code


class ServiceUnreachable(ServiceError):
    def __init__(self, url: str, err: Exception) -> None:
        super().__init__(0, f"cannot reach the PCM service at {url} ({err.__class__.__name__});"
                            " is `pcm serve` running? Set --service or PCM_SERVICE_URL")


class ServiceTLSError(ServiceError):
    """The service's certificate was refused: retrying cannot help."""

    def __init__(self, url: str, ca_file: Optional[str], err: Exception) -> None:
        super().__init__(0, tls_hint(url, ca_file, err), "tls")


def _error(resp: httpx.Response) -> ServiceError:
    try:
        body = resp.json()
    except ValueError:
        return ServiceError(resp.status_code, resp.text)
    if not isinstance(body, dict):
        return ServiceError(resp.status_code, str(body))
    return ServiceError(resp.status_code, str(body.get("detail", body)), body.get("code"))


class ServiceClient:
    """``retry_for`` > 0 keeps retrying connection failures (with backoff) that long:
    workers ride out a service restart this way."""

    def __init__(self, url: Optional[str] = None, timeout: float = 30.0, retry_for: float = 0.0,
                 token: Optional[str] = None, ca_file: Optional[str | Path] = None) -> None:
        self.url = (url or default_service_url()).rstrip("/")
        self.retry_for = retry_for
        self.ca_file = str(ca_file) if ca_file else default_ca_file()
        # the service's certificate is checked against ca_file, else the system store
        self.ssl_context = client_context(self.ca_file) if self.url.startswith("https:") else None
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, timeout=timeout, verify=self.ssl_context or True)

    def request(self, method: str, path: str, body: Optional[BaseModel] = None,
                response: Optional[type[T]] = None, *, bearer: Optional[str] = None, **params: Any) -> Any:
        """One call; ``bearer`` sends that credential instead of the client's token (a worker's own)."""
        path = path if path.startswith("/healthz") else API_PREFIX + path
        headers = self._headers if bearer is None else {**self._headers, "authorization": f"Bearer {bearer}"}
        content = body.model_dump_json() if body is not None else None
        deadline = time.monotonic() + self.retry_for
        delay = 0.2
        while True:
            try:
                resp = self._http.request(method, path, content=content, params=params or None,
                                          headers=headers)
                break
            except httpx.TransportError as e:
                if is_tls_failure(e):
                    raise ServiceTLSError(self.url, self.ca_file, e) from None
                if time.monotonic() + delay > deadline:
                    raise ServiceUnreachable(self.url, e) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        if resp.status_code >= 400:
            raise _error(resp)
        data = resp.json()
        return response.model_validate(data) if response is not None else data

    def submit_stream(self, header: WorkloadHeader, rows: Iterable[RowIn],
                      progress: Optional[Callable[[int], None]] = None) -> SubmitResponse:
        """Submit a workload as NDJSON, each row encoded as it is read from ``rows``, so neither
        end holds it whole; ``progress`` gets the rows sent so far. Not retried (the rows are
        read once); if ``rows`` raises, the request is cut off and the service keeps nothing."""

        def body() -> Iterator[bytes]:
            yield header.model_dump_json().encode() + b"\n"
            lines: list[str] = []
            sent = 0
            for row in rows:
                lines.append(row.model_dump_json(exclude_none=True))
                if len(lines) >= STREAM_ROWS:
                    sent += len(lines)
                    yield ("\n".join(lines) + "\n").encode()
                    lines.clear()
                    if progress:
                        progress(sent)
            if lines:
                yield ("\n".join(lines) + "\n").encode()
                if progress:
                    progress(sent + len(lines))

        try:
            resp = self._http.post(API_PREFIX + "/workload-streams", content=body(),
                                   headers={**self._headers, "content-type": NDJSON})
        except httpx.TransportError as e:
            if is_tls_failure(e):
                raise ServiceTLSError(self.url, self.ca_file, e) from None
            raise ServiceUnreachable(self.url, e) from None
        if resp.status_code >= 400:
            raise _error(resp)
        return SubmitResponse.model_validate(resp.json())

    def healthy(self) -> bool:
        try:
            self.request("GET", "/healthz")
            return True
        except ServiceError:
            return False

    def close(self) -> None:
        self._http.close()
