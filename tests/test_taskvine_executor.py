"""`--executor taskvine`: the service's TaskVine manager, glideins of the local factory running
real `vine_worker` processes, a Library per context holding the real vLLM CPU engine.

One run serves every check here: two glideins, a row longer than max_model_len, and a
`kill -9` of one vine_worker once rows are coming back: of the one that did NOT answer the
too-long row (TaskVine, not PCM, decides which worker runs which call; the worker killed
must not be the one whose library the test then checks), once that row is answered."""
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
# the row that does not fit the model: in batch 8 of 13, leased only once a few batches have been
# answered, so it runs on a worker whose engine is ready, while batches are left for that worker to
# run after it. Not an early batch: each library's first call waits for its engine to start, and
# the engine that starts last (seen: 12 s after the first, which meanwhile answered the other 12
# batches) answers its first call last, so its worker ran nothing after it
LONG_AT = 37
LONG_ANSWERED = ("SELECT w.worker_id, w.glidein_id, r.finished_at FROM rows r JOIN workers w USING (worker_id)"
                 " WHERE r.row_id='too-long' AND r.state='done' AND w.kind='vine_worker'")


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
    killed: dict[str, Any] = {}

    def kill_the_other_vine_worker(st: WorkloadStatus) -> None:
        """SIGKILL the vine_worker of the glidein that did not answer the too-long row, once it
        is answered: that row's worker (and its library) must live on to answer later batches."""
        if killed:
            return
        with sqlite3.connect(f"file:{tmp / 'state' / 'service' / 'pcm.sqlite3'}?mode=ro", uri=True) as conn:
            long = conn.execute(LONG_ANSWERED).fetchone()
        procs = vine_workers(tmp / "state" / "glideins")
        if long is None or len(procs) != 2:
            return
        others = [p for p in procs if f"/{long[1]}/" not in " ".join(p.info["cmdline"])]
        if len(others) == 1:
            others[0].send_signal(signal.SIGKILL)
            killed.update(pid=others[0].pid, rows_done=st.rows_done, spared=long[1])

    res = run_workload(load_workload(tmp / "wl.yaml"), tmp / "state", workers=2,
                       executor=ExecutorKind.TASKVINE, on_progress=kill_the_other_vine_worker)
    db = sqlite3.connect(tmp / "state" / "service" / "pcm.sqlite3")
    db.row_factory = sqlite3.Row
    yield {"result": res, "killed": killed, "db": db, "tmp": tmp,
           "lines": [json.loads(x) for x in Path(res.status.output).read_text().splitlines()]}
    db.close()


def test_texts_equal_llm_generate_every_row_once_after_a_kill_9(vine_run: dict[str, Any], tiny_model: Path,
                                                                  tmp_path: Path) -> None:
    assert vine_run["killed"], "no vine_worker was killed"
    assert vine_run["killed"]["rows_done"] < N + 1, vine_run["killed"]  # mid-run
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
    worker, glidein, answered_at = db.execute(LONG_ANSWERED).fetchone()
    assert vine_run["killed"]["spared"] == glidein, vine_run["killed"]
    # the same worker answered rows after it, with the library it had: one engine start
    later = db.execute("SELECT COUNT(*) FROM rows WHERE worker_id=? AND finished_at > ?",
                       (worker, answered_at)).fetchone()[0]
    starts = db.execute("SELECT COUNT(*) FROM library_events WHERE worker_id=? AND state='ready'",
                        (worker,)).fetchone()[0]
    batches = [tuple(r) for r in db.execute(
        "SELECT r.batch_id, w.glidein_id, MIN(r.finished_at) - ? FROM rows r JOIN workers w USING (worker_id)"
        " GROUP BY r.batch_id ORDER BY 3", (answered_at,))]
    assert later > 0 and starts == 1, (later, starts, vine_run["killed"], batches)


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
