"""Streamed submissions into a real `pcm serve`: a large workload in bounded memory with every
row kept in order; a bad line or a crash mid-stream leaves nothing behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from pcm_service.protocol import NDJSON, BatchState
from tests.support import REPO
from tests.support.memory import PeakRss, rss_mb
from tests.support.models import fake_model
from tests.support.serve import ServeProcess
from tests.support.state import db
from tests.support.waiting import wait_for

N_ROWS = 200_000
FILLER = "The committee reviewed the evidence on the river's course and the survey records. " * 4  # ~330 bytes
# growth of the service's RSS that streaming stays under: the same rows as one JSON body
# (66 MiB) take several times their size in the service (parsed JSON, then pydantic models)
RSS_GROWTH_LIMIT_MB = 100  # measured: streamed ~30 MiB, one JSON body ~300 MiB


def write_inputs(path: Path, n: int, bad_line: int | None = None) -> None:
    with path.open("w") as fh:
        for i in range(1, n + 1):
            row = {"id": f"claim-{i}", "claim": f"{i}: {FILLER}"}
            if i == bad_line:
                row.pop("claim")
            fh.write(json.dumps(row) + "\n")


def workload(tmp: Path, inputs: Path) -> Path:
    model = fake_model(tmp / "model")
    (tmp / "wl.yaml").write_text(yaml.safe_dump({
        "name": "big", "model": str(model), "batch_size": 100, "output": "out/big.jsonl",
        "inputs": {"path": str(inputs), "template": "Claim: {claim}\nVerdict:", "id_field": "id"}}))
    return tmp / "wl.yaml"


def pcm_submit(serve: ServeProcess, wl: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pcm_service.cli", "submit", str(wl), "--service", serve.url,
                             "--token-file", str(serve.api_token_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def stored(serve: ServeProcess) -> tuple[int, int, int]:
    """(workloads, batches, rows) in the service's state."""
    conn = db(serve.state_dir)
    try:
        return tuple(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("workloads", "batches", "rows"))
    finally:
        conn.close()


def test_200k_rows_stream_in_bounded_memory_every_row_in_order(serve: ServeProcess, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.jsonl"
    write_inputs(inputs, N_ROWS)
    assert serve.proc is not None
    base = rss_mb(serve.proc.pid)
    with PeakRss(serve.proc.pid) as peak:
        cli = pcm_submit(serve, workload(tmp_path, inputs))
        out, err = cli.communicate(timeout=600)
    assert cli.returncode == 0, err
    assert peak.peak - base < RSS_GROWTH_LIMIT_MB, (base, peak.peak)
    wl_id = out.split()[-1]
    conn = db(serve.state_dir)
    ids = [r[0] for r in conn.execute("SELECT row_id FROM rows WHERE workload_id=? ORDER BY idx", (wl_id,))]
    assert ids == [f"claim-{i}" for i in range(1, N_ROWS + 1)]
    assert conn.execute("SELECT rows_total FROM workloads WHERE workload_id=?", (wl_id,)).fetchone()[0] == N_ROWS
    states = conn.execute("SELECT state, COUNT(*) FROM batches GROUP BY state").fetchall()
    assert [tuple(s) for s in states] == [(BatchState.QUEUED.value, N_ROWS // 100)]


def test_bad_line_late_in_the_stream_names_it_and_leaves_nothing(serve: ServeProcess, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.jsonl"
    write_inputs(inputs, 30_000, bad_line=25_000)  # after several chunks were stored
    cli = pcm_submit(serve, workload(tmp_path, inputs))
    _, err = cli.communicate(timeout=300)
    assert cli.returncode == 2
    assert "inputs.jsonl line 25000 has no field 'claim'" in " ".join(err.split()), err
    wait_for(lambda: stored(serve) == (0, 0, 0), 30, "the staged rows to be removed", every=0.1)


def test_bad_row_sent_to_the_api_is_a_400_naming_line_and_field(serve: ServeProcess, tmp_path: Path) -> None:
    header = {"name": "x", "context": {"model": str(fake_model(tmp_path / "model"))}, "batch_size": 10,
              "output": str(tmp_path / "out.jsonl")}
    lines = [json.dumps(header)] + [json.dumps({"row_id": str(i), "prompt": "p"}) for i in range(5000)]
    lines[4001] = json.dumps({"row_id": "4000", "prompt": 7})
    http = httpx.Client(base_url=serve.url, headers={"authorization": f"Bearer {serve.api_token}"})
    r = http.post("/v1/pcm/workload-streams", content="\n".join(lines), headers={"content-type": NDJSON})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == "row.prompt" and "line 4002" in body["detail"], body
    lines[4001] = json.dumps({"row_id": "3", "prompt": "p"})
    r = http.post("/v1/pcm/workload-streams", content="\n".join(lines), headers={"content-type": NDJSON})
    assert r.status_code == 400 and "line 4002: row.row_id: duplicate row id '3'" in r.json()["detail"], r.text
    r = http.post("/v1/pcm/workload-streams", content="\n".join(lines), headers={"content-type": "application/json"})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", r.text
    assert stored(serve) == (0, 0, 0)
    lines[4001] = json.dumps({"row_id": "4000", "prompt": "p"})
    r = http.post("/v1/pcm/workload-streams", content="\n".join(lines), headers={"content-type": NDJSON})
    assert r.status_code == 201 and r.json()["rows"] == 5000, r.text


def test_crash_mid_stream_leaves_nothing_after_restart(serve: ServeProcess, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.jsonl"
    write_inputs(inputs, N_ROWS)
    cli = pcm_submit(serve, workload(tmp_path, inputs))
    wait_for(lambda: stored(serve)[2] > 0, 120, "the first rows to be stored", every=0.05)
    serve.kill()  # SIGKILL: the submission was never acknowledged
    _, err = cli.communicate(timeout=120)
    assert cli.returncode != 0
    assert stored(serve)[0] == 0
    serve.start()
    assert stored(serve) == (0, 0, 0)
