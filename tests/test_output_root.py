"""A workload's output files are written only under `pcm serve --output-root` (default: the
directory it runs in), never inside its state directory nor over a token (issue 28, item 6):
anything else is a 400 naming the field, and nothing of the workload is stored."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from pcm_service.cli.serve import output_roots
from tests.support.models import fake_model
from tests.support.serve import ServeProcess


def submission(model: Path, output: str, **fields: object) -> dict[str, object]:
    return {"name": "t", "context": {"model": str(model)}, "batch_size": 1, "output": output,
            "rows": [{"row_id": "a", "prompt": "p"}], **fields}


def count(serve: ServeProcess, table: str) -> int:
    with sqlite3.connect(serve.state_dir / "pcm.sqlite3") as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

Served = tuple[ServeProcess, Path, Path]  # the service, a model, its output root


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A service whose output root holds its state directory (as the default, the working
    directory, holds ./pcm-state); models under tmp_path."""
    (tmp_path / "outs").mkdir()
    s = ServeProcess(tmp_path / "outs" / "state", model_roots=[tmp_path],
                     output_roots=[tmp_path / "outs"]).start()
    yield s, fake_model(tmp_path / "model"), tmp_path / "outs"
    s.stop()


def test_an_output_outside_the_root_is_refused(served: Served, tmp_path: Path) -> None:
    serve, model, outs = served
    (tmp_path / "elsewhere").mkdir()
    (outs / "link").symlink_to(tmp_path / "elsewhere")  # inside the root by name, not where it leads
    refused = {
        str(tmp_path / "elsewhere" / "o.jsonl"): "outside every output root",
        str(outs / "link" / "o.jsonl"): "outside every output root",
        str(outs / ".." / "o.jsonl"): "outside every output root",
        "relative/o.jsonl": "not an absolute path",
        str(serve.state_dir / "pcm.sqlite3"): "inside the state directory",
        str(serve.state_dir / "o.jsonl"): "inside the state directory",
        str(outs): "is a directory",
    }
    headers = {"Authorization": f"Bearer {serve.api_token}"}
    with httpx.Client(base_url=serve.url, headers=headers, timeout=30) as http:
        for output, why in refused.items():
            r = http.post("/v1/pcm/workloads", json=submission(model, output))
            err = r.json()
            assert r.status_code == 400 and err["field"] == "output" and err["code"] == "invalid_value", (output, err)
            assert err["detail"].startswith("output: ") and why in err["detail"], (output, err["detail"])
        openai = {"endpoint": "/v1/completions", "error_output": str(tmp_path / "elsewhere" / "e.jsonl")}
        r = http.post("/v1/pcm/workloads", json=submission(model, str(outs / "o.jsonl"), openai=openai))
        assert r.status_code == 400 and r.json()["field"] == "openai.error_output", r.text
        header = {k: v for k, v in submission(model, str(tmp_path / "elsewhere" / "o.jsonl")).items() if k != "rows"}
        body = json.dumps(header) + "\n" + json.dumps({"row_id": "a", "prompt": "p"}) + "\n"
        r = http.post("/v1/pcm/workload-streams", content=body, headers={"Content-Type": "application/x-ndjson"})
        assert r.status_code == 400 and r.json()["field"] == "output", r.text
        # nothing stored for any of them: no workload, no row, not even the model
        assert (count(serve, "workloads"), count(serve, "rows"), count(serve, "models")) == (0, 0, 0)
        r = http.post("/v1/pcm/workloads", json=submission(model, str(outs / "sub" / "o.jsonl")))
        assert r.status_code == 201, r.text
        shown = http.get(f"/v1/pcm/workloads/{r.json()['workload_id']}").json()["output"]
        assert shown == str(outs / "sub" / "o.jsonl")


def serve_exit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcm_service.cli", "serve", "--state-dir", str(tmp_path / "state"),
                           "--port", "9", *args], capture_output=True, text=True, timeout=60)


def test_serve_refuses_an_output_root_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "state" / "inside").mkdir(parents=True)
    for root, why in ((tmp_path / "state" / "inside", "inside the state directory"),
                      (tmp_path / "missing", "not a directory")):
        res = serve_exit(tmp_path, "--output-root", str(root))
        err = " ".join(res.stderr.split())
        assert res.returncode == 2 and "--output-root" in err and why in err, err


def test_the_default_output_root_is_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert output_roots([], Path("pcm-state")) == (tmp_path.resolve(),)
    assert output_roots([tmp_path / "a" / ".."], tmp_path / "state") == (tmp_path.resolve(),)
