"""Stopping (even kill -9) and restarting `pcm serve` loses no workload and no finished row."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from pcm_service.protocol import (
    BatchReport,
    ContextState,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    ReportResponse,
    RowResult,
    SubmitResponse,
    WorkerRegistration,
    WorkloadStatus,
)
from pcm_service.workload import load_workload
from tests.support.serve import ServeProcess
from tests.support.workloads import WriteWorkload


def result(idx: int) -> RowResult:
    return RowResult(idx=idx, text=f"out-{idx}", finish_reason="stop", prompt_tokens=1, completion_tokens=1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill-9"])
def test_restart_mid_workload_keeps_workload_and_finished_rows(sig: signal.Signals, tmp_path: Path,
                                                               write_workload: WriteWorkload) -> None:
    serve = ServeProcess(tmp_path / "state").start()
    client = serve.client(retry_for=60.0)  # the user routes
    sub = load_workload(write_workload())  # 20 rows, batch size 5
    wl = client.request("POST", "/workloads", sub, SubmitResponse)
    # the worker's routes, with its own credential (which outlives the restart)
    wid, worker = serve.join(WorkerRegistration(host="h", pid=1), retry_for=60.0)
    worker.request("POST", f"/workers/{wid}/lease", LeaseRequest(max_batches=0))  # told what to load
    worker.request("POST", f"/workers/{wid}/library",
                   LibraryEvent(context_id=wl.context_id, state=ContextState.READY, seconds=1))
    ready = LeaseRequest(context_id=wl.context_id, context_state=ContextState.READY, max_batches=2)
    first = worker.request("POST", f"/workers/{wid}/lease", ready, LeaseResponse).batches
    done_before = [r.idx for r in first[0].rows] + [first[1].rows[0].idx]
    worker.request("POST", f"/workers/{wid}/report",
                   BatchReport(batch_id=first[0].batch_id, results=[result(r.idx) for r in first[0].rows]))
    worker.request("POST", f"/workers/{wid}/report",
                   BatchReport(batch_id=first[1].batch_id, results=[result(first[1].rows[0].idx)]))

    serve.kill(sig)
    serve.start()  # same port, same state directory

    st = client.request("GET", f"/workloads/{wl.workload_id}", response=WorkloadStatus)
    assert (st.rows_total, st.rows_done, st.state.value) == (20, len(done_before), "running")
    # The same worker carries on: its lease on the second batch survived the restart.
    rep = worker.request("POST", f"/workers/{wid}/report", BatchReport(
        batch_id=first[1].batch_id, results=[result(r.idx) for r in first[1].rows]), ReportResponse)
    assert (rep.accepted, rep.duplicates) == (4, 1)
    while True:
        leases = worker.request("POST", f"/workers/{wid}/lease", ready, LeaseResponse).batches
        if not leases:
            break
        for b in leases:
            assert not set(r.idx for r in b.rows) & set(done_before)
            worker.request("POST", f"/workers/{wid}/report",
                           BatchReport(batch_id=b.batch_id, results=[result(r.idx) for r in b.rows]))
    st = client.request("GET", f"/workloads/{wl.workload_id}", response=WorkloadStatus)
    assert st.state.value == "completed" and st.rows_done == 20
    lines = [json.loads(x) for x in Path(st.output).read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"r{i}" for i in range(20)]
    assert [x["text"] for x in lines] == [f"out-{i}" for i in range(20)]
    serve.stop()
