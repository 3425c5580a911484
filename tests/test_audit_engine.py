"""Spot-check audits with the real engine (issue 28, item 7): a worker returns altered text for
the batch it leased; a real `pcm worker` (vLLM CPU) on another host audits it, the liar's host
is barred, and the workload's output equals vLLM's own LLM.generate."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pcm_service.protocol import (
    BatchReport,
    ContextState,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RowResult,
    ServiceStatus,
    SubmitResponse,
    WorkerRegistration,
    WorkloadStatus,
)
from pcm_service.workload import load_workload
from tests.support import REPO
from tests.support.serve import ServeProcess
from tests.support.waiting import wait_for
from tests.support.workloads import assert_exactly_once_and_identical, expected, write_engine_workload

pytestmark = pytest.mark.engine
N_ROWS = 20


def test_altered_text_is_caught_by_a_real_worker_and_the_output_equals_llm_generate(
        tiny_model: Path, tmp_path: Path) -> None:
    sub = load_workload(write_engine_workload(tmp_path, tiny_model, N_ROWS, batch_size=5, name="audited"))
    serve = ServeProcess(tmp_path / "state", "--audit-fraction", "1.0", "--output-root", str(tmp_path)).start()
    worker = None
    try:
        client = serve.client()
        wl = client.request("POST", "/workloads", sub, SubmitResponse)
        # the liar (its own credential, another host): told to load the context, "ready", one batch made up
        liar, own = serve.join(WorkerRegistration(host="liar-host", pid=1))
        assert own.request("POST", f"/workers/{liar}/lease", LeaseRequest(max_batches=0),
                           LeaseResponse).assign_context.context_id == wl.context_id
        own.request("POST", f"/workers/{liar}/library", LibraryEvent(context_id=wl.context_id,
                                                                    state=ContextState.READY))
        [made_up] = own.request("POST", f"/workers/{liar}/lease", LeaseRequest(
            context_id=wl.context_id, context_state=ContextState.READY, max_batches=1), LeaseResponse).batches
        own.request("POST", f"/workers/{liar}/report", BatchReport(batch_id=made_up.batch_id, results=[
            RowResult(idx=r.idx, text="SUPPORTED, trust me", finish_reason="stop") for r in made_up.rows]))
        # an honest glidein joins: a real agent and engine
        (tmp_path / "w").mkdir()
        with (tmp_path / "w" / "worker.log").open("ab") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "pcm_service.cli", "worker", "--service", serve.url,
                 "--token-file", str(serve.pool_token_file), "--work-dir", str(tmp_path / "w"),
                 "--idle-timeout", "600"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: client.request("GET", f"/workloads/{wl.workload_id}", response=WorkloadStatus).state.value
                 == "completed", 600, "the audited workload to complete", every=0.5)
        status = client.request("GET", "/status", None, ServiceStatus)
        hosts = {h.host: h for h in status.audits}
        assert hosts["liar-host"].barred and hosts["liar-host"].disagreements == 1
        assert [h.host for h in status.audits if h.barred] == ["liar-host"]
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        serve.stop()
    lines = assert_exactly_once_and_identical(Path(sub.output), expected(tiny_model, N_ROWS, tmp_path))
    assert "trust me" not in json.dumps(lines)
