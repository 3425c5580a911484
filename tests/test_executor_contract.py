"""The executor contract (pcm_service/executors/base.py), the same scenario through every
executor: a real `pcm serve --executor KIND`, one glidein's `pcm worker` (an agent, or a
vine_worker against the service's TaskVine manager), a small workload on the real vLLM CPU
engine. Each executor must take the leases, run them, report every row's result once through
the core, and report its worker's states: the generic status (``ExecutorStatus``, in the API's
``/status``, ``/metrics`` and `pcm status`) shows the worker connected, then no batch in
flight, then the worker gone once its glidein leaves. One engine start per executor."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import httpx
import psutil
import pytest
import yaml

from pcm_service.client import ServiceClient
from pcm_service.protocol import (
    ExecutorKind,
    ExecutorStatus,
    ServiceStatus,
    SubmitResponse,
    WorkerKind,
    WorkerStatus,
    WorkloadState,
    WorkloadStatus,
)
from pcm_service.workload import load_workload
from tests.support import REPO
from tests.support.models import ENGINE
from tests.support.serve import ServeProcess
from tests.support.taskvine import require_taskvine
from tests.support.waiting import wait_for

pytestmark = pytest.mark.engine
N_ROWS = 6
GLIDEIN = "contract.0"
WORKER_KIND = {ExecutorKind.NATIVE: WorkerKind.AGENT, ExecutorKind.TASKVINE: WorkerKind.VINE_WORKER}
SERVE_ARGS = {ExecutorKind.NATIVE: (), ExecutorKind.TASKVINE: ("--vine-port", "0")}


def write_workload(tmp: Path, model: Path) -> Path:
    rows = [{"id": f"k{i}", "claim": f"Claim {i}: the bridge {i} spans the river."} for i in range(N_ROWS)]
    (tmp / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "wl.yaml").write_text(yaml.safe_dump({
        "name": "contract", "model": str(model), "engine": ENGINE, "sampling": {"temperature": 0, "max_tokens": 8},
        "inputs": {"path": "inputs.jsonl", "template": "Claim: {claim}\nVerdict:", "id_field": "id"},
        "batch_size": 2, "output": "out/results.jsonl"}))
    return tmp / "wl.yaml"


def status(client: ServiceClient) -> ServiceStatus:
    return client.request("GET", "/status", response=ServiceStatus)


def executor_view(client: ServiceClient, kind: ExecutorKind) -> tuple[ExecutorStatus, list[WorkerStatus]]:
    """The generic executor status and the glidein's worker records, as the API reports them."""
    st = status(client)
    assert st.executor is not None and st.executor.kind == kind, st.executor
    return st.executor, [w for w in st.workers if w.glidein_id == GLIDEIN]


def start_glidein(serve: ServeProcess, work: Path) -> subprocess.Popen[bytes]:
    """What a glidein runs: `pcm worker`, which asks the service which executor it has. In its
    own process group, as a glidein is: the TaskVine path kills what is left of its group
    when vine_worker exits, which here would otherwise be this test and its `pcm serve`."""
    work.mkdir()
    with (work / "worker.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pcm_service.cli", "worker", "--service", serve.url, "--glidein-id", GLIDEIN,
             "--token-file", str(serve.pool_token_file), "--work-dir", str(work), "--idle-timeout", "600",
             "--no-serve-blobs"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def stop_tree(proc: Optional[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the glidein (it passes it on to vine_worker), then kill whatever of it is left."""
    if proc is None:
        return
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def metric(text: str, name: str, **labels: str) -> float:
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key + " "))


@pytest.mark.parametrize("kind", [ExecutorKind.NATIVE, ExecutorKind.TASKVINE], ids=lambda k: k.value)
def test_every_executor_runs_a_workload_once_and_reports_its_worker(
        kind: ExecutorKind, tiny_model: Path, tmp_path: Path) -> None:
    if kind == ExecutorKind.TASKVINE:
        require_taskvine()
    sub = load_workload(write_workload(tmp_path, tiny_model))
    serve = ServeProcess(tmp_path / "state", "--executor", kind.value, *SERVE_ARGS[kind]).start()
    glidein = None
    try:
        client = serve.client()
        before, _ = executor_view(client, kind)
        assert (before.workers_known, before.workers_connected, before.batches_in_flight) == (0, 0, 0)
        assert (before.taskvine is not None) == (kind == ExecutorKind.TASKVINE)
        wl = client.request("POST", "/workloads", sub, SubmitResponse)
        glidein = start_glidein(serve, tmp_path / "glidein")

        # its worker joins through the executor's own path and is reported connected
        ex, mine = wait_for(lambda: (v := executor_view(client, kind))[0].workers_connected == 1 and v[1] and v,
                            120, f"the {kind.value} executor to report the glidein's worker connected")
        assert ex.workers_known == 1 and [w.kind for w in mine] == [WORKER_KIND[kind]], (ex, mine)

        done = wait_for(lambda: (w := client.request("GET", f"/workloads/{wl.workload_id}",
                                                     response=WorkloadStatus)).state != WorkloadState.RUNNING and w,
                        300, "the workload to finish", every=0.5)
        assert done.state == WorkloadState.COMPLETED and done.rows_done == N_ROWS and done.rows_failed == 0, done

        # every row exactly one result, in input order
        lines = [json.loads(x) for x in Path(sub.output).read_text().splitlines()]
        assert [x["id"] for x in lines] == [f"k{i}" for i in range(N_ROWS)]
        assert all(x["error"] is None and x["text"] and 0 < x["completion_tokens"] <= 8 for x in lines), lines

        # the worker stays, idle: still known and connected, no batch in flight
        ex, mine = wait_for(lambda: (v := executor_view(client, kind))[0].batches_in_flight == 0
                            and v[0].workers_busy == 0 and v, 30, "no batch in flight")
        assert (ex.workers_known, ex.workers_connected) == (1, 1) and len(mine) == 1, (ex, mine)
        assert sum(w.rows_done for w in status(client).workers) == N_ROWS  # reported under the executor's workers
        text = httpx.get(f"{serve.url}/metrics", headers={"Authorization": f"Bearer {serve.api_token}"},
                         timeout=30).text
        assert metric(text, "pcm_executor_workers", executor=kind.value, state="connected") == 1
        assert metric(text, "pcm_executor_batches_in_flight", executor=kind.value) == 0
        cli = subprocess.run([sys.executable, "-m", "pcm_service.cli", "status", "--service", serve.url,
                              "--token-file", str(serve.api_token_file)], capture_output=True, text=True, cwd=REPO)
        assert f"Executor: {kind.value}, 1 of 1 worker connected, 0 busy, 0 batches in flight" in cli.stdout, cli

        # the glidein leaves: its worker is reported gone
        stop_tree(glidein)
        glidein = None
        ex, mine = wait_for(lambda: (v := executor_view(client, kind))[0].workers_known == 0 and v, 60,
                            "the executor to report the worker gone")
        assert ex.workers_connected == 0 and not mine, (ex, mine)
    except BaseException:  # what the service and the glidein said, for the failure's report
        code = serve.proc.poll() if serve.proc is not None else None
        print(f"pcm serve exit status: {code}\n", serve.log_path.read_text()[-4000:])
        print((tmp_path / "glidein" / "worker.log").read_text(errors="replace")[-4000:]
              if (tmp_path / "glidein" / "worker.log").exists() else "no glidein log")
        raise
    finally:
        stop_tree(glidein)
        serve.stop()
