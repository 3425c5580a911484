"""HTTP hygiene of a real `pcm serve` and of the worker's blob server (issue 28, item 6): what
every answer says to browsers, no third-party scripts, login and logout only from the page
itself, NUL paths refused naming the field, a linear and bounded NDJSON splitter, and a blob
server whose connections are bounded and dropped when silent."""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
from pathlib import Path

import httpx
import pytest

from pcm_service.api.ingest import IngestError, ndjson_lines
from pcm_service.core import ServiceConfig
from pcm_service.tokens import peer_key, sign_peer_request
from tests.support.models import fake_model
from tests.support.serve import ServeProcess
from worker_image.blobserver import BlobServer

LINE = ServiceConfig.max_request_bytes  # the service's own line limit


def api(serve: ServeProcess) -> httpx.Client:
    return httpx.Client(base_url=serve.url, timeout=30, headers={"Authorization": f"Bearer {serve.api_token}"})


def test_every_answer_says_nosniff_and_no_store(serve: ServeProcess) -> None:
    with api(serve) as http:
        answers = [http.get("/v1/pcm/status"), http.get("/ui/status"), http.get("/openapi.json"),
                   http.get("/v1/pcm/workloads/wl-none"), httpx.get(f"{serve.url}/v1/pcm/status"),
                   http.post("/v1/pcm/workloads", json={"name": 1}), http.delete("/v1/pcm/status")]
        assert [r.status_code for r in answers] == [200, 200, 200, 404, 401, 422, 405]
        for r in answers:
            assert r.headers["x-content-type-options"] == "nosniff", r.url
            assert r.headers["cache-control"] == "no-store", r.url


def test_no_page_loads_a_script_from_another_site(serve: ServeProcess) -> None:
    with api(serve) as http:
        # FastAPI's /docs and /redoc fetch swagger-ui and redoc from a CDN: not served
        assert http.get("/docs").status_code == 404 and http.get("/redoc").status_code == 404
        assert http.get("/openapi.json").json()["paths"]  # the API's description stays
        page = http.get("/").text
        assert "src=" not in page.replace('src="/', "") and "https://" not in page
        assert "default-src 'self'" in http.get("/").headers["content-security-policy"]


def test_login_and_logout_refuse_other_sites_pages(serve: ServeProcess) -> None:
    here = serve.url  # http://127.0.0.1:PORT: what a browser on the page sends as Origin
    with httpx.Client(base_url=serve.url, timeout=30) as http:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site", "Origin": here}):
            r = http.post("/ui/login", data={"token": serve.api_token}, headers=headers)
            assert r.status_code == 403 and r.json()["code"] == "cross_site_request", headers
            assert "set-cookie" not in r.headers
            r = http.post("/ui/logout", headers=headers)
            assert r.status_code == 403 and "set-cookie" not in r.headers, headers
        assert http.get("/ui/status").status_code == 401  # no forced login happened
        # the page's own fetch: same origin, as Chromium sends it (tests/test_status_page.py runs the page)
        same = {"Origin": here, "Sec-Fetch-Site": "same-origin"}
        assert http.post("/ui/login", data={"token": serve.api_token}, headers=same).status_code == 204
        assert http.get("/ui/status").status_code == 200
        assert http.post("/ui/logout", headers={"Origin": "https://evil.example"}).status_code == 403
        assert http.get("/ui/status").status_code == 200  # still logged in: no forced logout
        assert http.post("/ui/logout", headers=same).status_code == 204
        assert http.get("/ui/status").status_code == 401


@pytest.mark.parametrize("where", ["context.model", "output", "openai.error_output"])
def test_a_nul_or_control_character_in_a_path_is_a_422_naming_the_field(
        serve: ServeProcess, tmp_path: Path, where: str) -> None:
    model = str(fake_model(tmp_path / "m"))
    body: dict[str, object] = {"name": "t", "context": {"model": model}, "batch_size": 1,
                               "output": str(tmp_path / "out.jsonl"), "rows": [{"row_id": "0", "prompt": "p"}]}
    bad = str(tmp_path / "a\x00b")
    if where == "context.model":
        body["context"] = {"model": model + "\x00/../x"}
    elif where == "output":
        body["output"] = bad
    else:
        body["openai"] = {"endpoint": "/v1/completions", "error_output": str(tmp_path / "err\nx.jsonl")}
    with api(serve) as http:
        r = http.post("/v1/pcm/workloads", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["field"] == where and "pattern" in r.json()["detail"]
        # the streamed form: line 1, the same field
        header = {k: v for k, v in body.items() if k != "rows"}
        lines = [json.dumps(header), json.dumps({"row_id": "0", "prompt": "p"})]
        r = http.post("/v1/pcm/workload-streams", content="\n".join(lines).encode(),
                      headers={"Content-Type": "application/x-ndjson"})
        assert r.status_code == 400 and r.json()["field"] == where and r.json()["detail"].startswith("line 1: ")
        # served models and model registrations take paths too
        r = http.post("/v1/pcm/served-models", json={"name": "m", "path": bad})
        assert r.status_code == 422 and r.json()["field"] == "path"
        r = http.post("/v1/pcm/models", json={"path": bad})
        assert r.status_code == 422 and r.json()["field"] == "path"
        status = http.get("/v1/pcm/status").json()
        assert status["workloads"] == [] and http.get("/v1/pcm/served-models").json() == []
        assert not list(tmp_path.glob("a*")) and not list(tmp_path.glob("err*"))


def test_the_ndjson_splitter_is_exact_wherever_the_stream_is_cut() -> None:
    rng = random.Random(5)
    lines = [os.urandom(rng.randrange(0, 3000)).replace(b"\n", b"x") for _ in range(300)]
    body = b"\n".join(lines) + b"\n\n" + b"tail without newline"
    cuts = sorted(rng.sample(range(1, len(body)), 2000))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    want = [(i + 1, line) for i, line in enumerate(body.split(b"\n")) if line.strip()]
    assert list(ndjson_lines(chunks, LINE)) == want
    assert list(ndjson_lines([body[i:i + 1] for i in range(20_000)], LINE)) == \
        [(n, line) for n, line in ndjson_lines([body[:20_000]], LINE)]


def test_a_line_over_the_bound_is_refused_naming_its_line_before_it_is_read_whole() -> None:
    read = 0

    def stream() -> object:
        nonlocal read
        yield b'{"name": "t"}\n{"row_id": "0"}\n'
        for _ in range(10_000):  # a 10 MB line, 1 KiB at a time
            read += 1024
            yield b"a" * 1024

    with pytest.raises(IngestError) as e:
        list(ndjson_lines(stream(), max_line=64 * 1024))  # type: ignore[arg-type]
    assert e.value.line == 3 and "longer than 65536 bytes" in str(e.value)
    assert read <= 65 * 1024  # it stopped at the bound, not at the end of the line
    with pytest.raises(IngestError) as e:  # a long line that ends within one chunk
        list(ndjson_lines([b"ok\n" + b"b" * 100 + b"\nnext\n"], max_line=50))
    assert e.value.line == 2


def test_the_blob_server_bounds_its_connections_and_drops_silent_ones(tmp_path: Path) -> None:
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    chunk = hashlib.sha256(data).hexdigest()
    token = "pool token"
    srv = BlobServer(lambda c: (tmp_path / "f", 0, len(data)) if c == chunk else None, token,
                     max_connections=4, idle_timeout=3.0).start()
    host, port = srv.url.removeprefix("http://").split(":")
    before = {t.ident for t in threading.enumerate()}
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
    try:
        # the server closes every connection (recv gives b"", never the 10 s socket timeout):
        # the 16 over the bound at once, while the first 4 hold their threads ...
        for s in idle[4:]:
            assert s.recv(1) == b""
        handlers = [t for t in threading.enumerate() if t.ident not in before]
        assert len(handlers) == 4 and all(t.is_alive() for t in handlers)
        # ... and those 4 once silent for the idle timeout
        for s in idle[:4]:
            assert s.recv(1) == b""
        # the places are free again: a signed GET is served in full
        path = f"/v1/pcm/blobs/{chunk}"
        r = httpx.get(f"{srv.url}{path}", headers={"Authorization": sign_peer_request(peer_key(token), "GET", path)})
        assert r.status_code == 200 and r.content == data
    finally:
        for s in idle:
            s.close()
        srv.stop()
