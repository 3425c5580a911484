"""`--executor taskvine`: the service's TaskVine manager, glideins of the local factory running
real `vine_worker` processes, a Library per context holding the real vLLM CPU engine.

One run serves every check here: two glideins, a row longer than max_model_len, and a
`kill -9` of one vine_worker once rows are coming back."""
from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pcm_service.protocol import ExecutorKind, WorkloadStatus
from pcm_service.workload import load_workload
from tests.support.models import ENGINE
from tests.support.taskvine import require_taskvine
from tests.support.workloads import SAMPLING, expected, rows

require_taskvine()

N = 60
LONG_AT = 7  # the row that does not fit the model: an early batch, so its worker runs more after it


def vine_workers(glideins: Path) -> list[Any]:
    import psutil

    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "vine_worker" and str(glideins) in " ".join(p.info["cmdline"] or [])]


@pytest.fixture(scope="module")
def vine_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from pcm_service.cli.embedded import run_workload

    tmp = tmp_path_factory.mktemp("vine-run")
    inputs = rows(N)
    inputs.insert(LONG_AT, {"id": "too-long", "claim": "a very long claim " * 200})
    (tmp / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    (tmp / "wl.yaml").write_text(yaml.safe_dump({
        "name": "vine", "model": str(tiny_model), "engine": ENGINE, "sampling": SAMPLING, "batch_size": 5,
        "inputs": {"path": "inputs.jsonl", "template": "Claim: {claim}\nVerdict:", "id_field": "id"},
        "output": "out/results.jsonl"}))
    killed: list[int] = []

    def kill_one_vine_worker(st: WorkloadStatus) -> None:
        if not killed and st.rows_done >= 10:
            procs = vine_workers(tmp / "state" / "glideins")
            if len(procs) == 2:
                procs[0].send_signal(signal.SIGKILL)
                killed.append(procs[0].pid)

    res = run_workload(load_workload(tmp / "wl.yaml"), tmp / "state", workers=2,
                       executor=ExecutorKind.TASKVINE, on_progress=kill_one_vine_worker)
    db = sqlite3.connect(tmp / "state" / "service" / "pcm.sqlite3")
    db.row_factory = sqlite3.Row
    yield {"result": res, "killed": killed, "db": db, "tmp": tmp,
           "lines": [json.loads(x) for x in Path(res.status.output).read_text().splitlines()]}
    db.close()


def test_texts_equal_llm_generate_every_row_once_after_a_kill_9(vine_run: dict[str, Any], tiny_model: Path,
                                                                  tmp_path: Path) -> None:
    assert vine_run["killed"], "no vine_worker was killed mid-run"
    lines = vine_run["lines"]
    ids = [r["id"] for r in rows(N)]
    ids.insert(LONG_AT, "too-long")
    assert [x["id"] for x in lines] == ids  # every row exactly once, in input order
    texts = [x["text"] for x in lines if x["id"] != "too-long"]
    assert all(x["error"] is None for x in lines if x["id"] != "too-long")
    assert texts == expected(tiny_model, N, tmp_path)
    assert vine_run["result"].status.rows_done == N + 1


def test_a_row_longer_than_max_model_len_is_an_error_row_and_the_library_stays_up(
        vine_run: dict[str, Any]) -> None:
    long = next(x for x in vine_run["lines"] if x["id"] == "too-long")
    assert long["text"] is None and "maximum context length" in long["error"], long
    db = vine_run["db"]
    worker = db.execute("SELECT worker_id FROM rows WHERE row_id='too-long'").fetchone()["worker_id"]
    later = db.execute("SELECT COUNT(*) FROM rows r JOIN batches b USING (batch_id) WHERE r.worker_id=?"
                       " AND b.batch_id > (SELECT batch_id FROM rows WHERE row_id='too-long')",
                       (worker,)).fetchone()[0]
    starts = db.execute("SELECT COUNT(*) FROM library_events WHERE worker_id=? AND state='ready'",
                        (worker,)).fetchone()[0]
    assert later > 0 and starts == 1  # the same library process ran that worker's later batches


def test_each_vine_worker_starts_the_engine_once_over_many_batches(vine_run: dict[str, Any]) -> None:
    db = vine_run["db"]
    workers = db.execute("SELECT worker_id, glidein_id, state FROM workers WHERE kind='vine_worker'").fetchall()
    assert len(workers) >= 2 and all(w["glidein_id"] and w["glidein_id"].startswith("local.") for w in workers)
    starts = vine_run["result"].library_starts
    batches = {r["worker_id"]: r["n"] for r in db.execute(
        "SELECT worker_id, COUNT(DISTINCT batch_id) AS n FROM rows GROUP BY worker_id")}
    assert all(starts.get(w["worker_id"], 0) <= 1 for w in workers), starts  # one context, one start each
    assert max(batches.values()) >= 4, batches  # over many batches
    manager = db.execute("SELECT COUNT(*) FROM workers WHERE kind='vine_manager'").fetchone()[0]
    assert manager == 1
