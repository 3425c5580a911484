"""Strict requests against a real `pcm serve`: wrong types refused (422, field named), one error
body shape with a code, size limits (413), OPTIONS and 405 with Allow; a refusal stores nothing."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.support.models import fake_model
from tests.support.serve import ServeProcess

LIMIT_KIB = 4  # --max-request-mb, in KiB, for the 413 checks


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    s = ServeProcess(tmp_path / "state", "--max-request-mb", str(LIMIT_KIB / 1024),
                     "--max-submission-mb", str(2 * LIMIT_KIB / 1024), model_roots=[tmp_path]).start()
    yield s
    s.stop()


def workloads(serve: ServeProcess) -> int:
    with sqlite3.connect(serve.state_dir / "pcm.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM workloads").fetchone()[0])


def submission(model: Path, **over: Any) -> dict[str, Any]:
    sub: dict[str, Any] = {"name": "t", "context": {"model": str(model)}, "batch_size": 2,
                           "output": str(model.parent / "out.jsonl"),
                           "rows": [{"row_id": "a", "prompt": "p"}, {"row_id": "b", "prompt": "q"}]}
    sub.update(over)
    return sub


def test_wrong_types_are_refused_naming_the_field(serve: ServeProcess, tmp_path: Path) -> None:
    model = fake_model(tmp_path / "model")
    api = {"Authorization": f"Bearer {serve.api_token}"}
    with httpx.Client(base_url=serve.url, headers=api) as http:
        for over, field in (({"sampling": {"frequency_penalty": False}}, "sampling.frequency_penalty"),
                            ({"sampling": {"temperature": "0.5"}}, "sampling.temperature"),
                            ({"batch_size": "2"}, "batch_size"), ({"batch_size": 1.5}, "batch_size"),
                            ({"batch_size": True}, "batch_size"), ({"batch_size": 2**60}, "batch_size"),
                            ({"name": 7}, "name")):
            r = http.post("/v1/pcm/workloads", json=submission(model, **over))
            assert r.status_code == 422, (over, r.text)
            assert r.json()["code"] == "invalid_request" and r.json()["field"] == field, (over, r.json())
        as_json = {"content-type": "application/json"}
        raw = json.dumps(submission(model, sampling={"temperature": 12345})).replace("12345", "1e999")
        r = http.post("/v1/pcm/workloads", content=raw, headers=as_json)  # Infinity is no number here
        assert r.status_code == 422 and r.json()["field"] == "sampling.temperature", r.text
        r = http.post("/v1/pcm/workloads", content=b'{"name": "\\ud800"}', headers=as_json)
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text  # a lone surrogate
        dup = submission(model, rows=[{"row_id": "a", "prompt": "p"}, {"row_id": "a", "prompt": "q"}])
        r = http.post("/v1/pcm/workloads", json=dup)  # fits the schema, breaks a rule: 400
        assert r.status_code == 400 and r.json()["code"] == "invalid_value" and "duplicate" in r.json()["detail"]
        r = http.put("/v1/pcm/factory/limits", json={"min_workers": 3, "max_workers": 1})
        assert r.status_code == 400 and "below min_workers" in r.json()["detail"]
        report = {"factory": "f", "backend": "local", "at": 1.0,
                  "decisions": [{"at": 1.0, "wanted": 1, "submit": False}]}
        r = http.post("/v1/pcm/factory/report", json=report)
        assert r.status_code == 422 and r.json()["field"] == "decisions.0.submit", r.text
        assert workloads(serve) == 0
        r = http.post("/v1/pcm/workloads", json=submission(model, batch_size=2.0))  # JSON Schema's integer
        assert r.status_code == 201, r.text
        r = http.get("/v1/pcm/workloads/wl-nobody")
        assert r.status_code == 404 and r.json() == {"code": "not_found", "detail": "unknown workload wl-nobody",
                                                     "field": None, "errors": []}
    assert workloads(serve) == 1


def test_bodies_over_the_limit_get_413_and_change_nothing(serve: ServeProcess, tmp_path: Path) -> None:
    model = fake_model(tmp_path / "model")
    api = {"Authorization": f"Bearer {serve.api_token}"}
    big_rows = [{"row_id": str(i), "prompt": "x" * 100} for i in range(3 * LIMIT_KIB * 1024 // 100)]
    report = {"factory": "f", "backend": "local", "at": 1.0,
              "decisions": [{"at": 1.0, "wanted": 1, "reason": "x" * (2 * LIMIT_KIB * 1024)}]}

    def chunks(body: bytes) -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for i in range(0, len(body), 512):
            yield body[i:i + 512]

    with httpx.Client(base_url=serve.url, headers=api) as http:
        for route, body in (("/v1/pcm/workloads", submission(model, rows=big_rows)),
                            ("/v1/pcm/factory/report", report)):
            raw = json.dumps(body).encode()
            for content in (raw, chunks(raw)):
                r = http.post(route, content=content, headers={"content-type": "application/json"})
                assert r.status_code == 413, (route, r.text[:300])
                assert r.json()["code"] == "request_too_large"
        assert http.get("/v1/pcm/factory").json()["reports"] == []
        assert http.post("/v1/pcm/workloads", json=submission(model)).status_code == 201  # under the limit
    assert workloads(serve) == 1


def test_options_and_unsupported_methods_answer_with_allow(serve: ServeProcess) -> None:
    with httpx.Client(base_url=serve.url) as http:
        r = http.options("/v1/pcm/factory/limits")
        assert r.status_code == 204 and set(r.headers["allow"].split(", ")) >= {"GET", "PUT", "OPTIONS"}
        r = http.patch("/v1/pcm/factory/limits", json={})
        assert r.status_code == 405 and {"GET", "PUT"} <= set(r.headers["allow"].split(", "))
        assert r.json()["code"] == "method_not_allowed"
        r = http.delete("/v1/pcm/workloads")
        assert r.status_code == 405 and "POST" in r.headers["allow"]
        assert http.options("/v1/nothing-here").status_code == 404
