"""Preemption of the service and of a worker, with real processes and the vLLM CPU engine.

One scenario: `pcm serve` + worker A run a workload; the service is killed with SIGKILL and
restarted mid-run (A rides it out with its engine loaded); later A gets SIGTERM mid-batch (an
HTCondor vacate); worker B finishes. Every row must end exactly once, identical to vLLM's own
LLM.generate.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from pcm_service.protocol import BatchState, ServiceStatus, SubmitResponse, WorkloadStatus
from pcm_service.workload import load_workload
from tests.support import REPO
from tests.support.serve import ServeProcess
from tests.support.state import db, files_containing
from tests.support.waiting import wait_for
from tests.support.workloads import assert_exactly_once_and_identical, expected, write_engine_workload

pytestmark = pytest.mark.engine
N_ROWS = 600


def start_worker(serve: ServeProcess, work_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    work_dir.mkdir(parents=True)
    with (work_dir / "worker.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pcm_service.cli", "worker", "--service", serve.url,
             "--token-file", str(serve.pool_token_file), "--work-dir", str(work_dir),
             "--idle-timeout", "600", *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


@dataclass
class Scenario:
    tmp: Path
    serve: ServeProcess
    output: Path
    worker_a: str = ""
    restarted_at: float = 0.0
    done_by_a_before_sigterm: set[str] = field(default_factory=set)
    requeue_seconds: float = 0.0
    handed_back: int = 0
    a_state: str = ""


@pytest.fixture(scope="module")
def scenario(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("eviction")
    sub = load_workload(write_engine_workload(tmp, tiny_model, N_ROWS))
    serve = ServeProcess(tmp / "state", "--heartbeat-interval", "1").start()
    client = serve.client(retry_for=60.0)
    # 192 rows in flight: each row then takes several seconds, far more than the 1 s drain
    procs = [start_worker(serve, tmp / "a", "--target-rows", "192")]
    try:
        wl = client.request("POST", "/workloads", sub, SubmitResponse)
        sc = Scenario(tmp=tmp, serve=serve, output=Path(sub.output))

        def done() -> int:
            return client.request("GET", f"/workloads/{wl.workload_id}", response=WorkloadStatus).rows_done

        # 1. kill -9 the service mid-workload and start it again on the same state and port
        wait_for(lambda: done() >= N_ROWS // 5, 600, "a fifth of the rows", every=0.2)
        sc.worker_a = client.request("GET", "/status", response=ServiceStatus).workers[0].worker_id
        serve.kill(signal.SIGKILL)
        serve.start()
        sc.restarted_at = time.time()

        # 2. SIGTERM worker A while it has rows in flight (HTCondor's vacate)
        wait_for(lambda: done() >= N_ROWS // 2, 600, "half the rows", every=0.2)
        conn = db(serve.state_dir)
        sc.done_by_a_before_sigterm = {r[0] for r in conn.execute(
            "SELECT row_id FROM rows WHERE state='done' AND worker_id=?", (sc.worker_a,))}
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        wait_for(lambda: conn.execute("SELECT COUNT(*) FROM batches WHERE state=?", (BatchState.LEASED.value,))
                 .fetchone()[0] == 0, 30, "A's rows back in the queue", every=0.02)
        sc.requeue_seconds = time.monotonic() - t0
        sc.handed_back = conn.execute(  # leased to A once, back in the queue with rows to run
            "SELECT COUNT(*) FROM batches WHERE state='queued' AND leased_at IS NOT NULL").fetchone()[0]
        print(f"[eviction] SIGTERM → {sc.handed_back} batches back in the queue after"
              f" {sc.requeue_seconds:.2f}s", file=sys.stderr)
        assert procs[0].wait(30) == 0
        sc.a_state = conn.execute("SELECT state FROM workers WHERE worker_id=?", (sc.worker_a,)).fetchone()[0]

        # 3. worker B finishes the workload
        procs.append(start_worker(serve, tmp / "b"))
        wait_for(lambda: client.request("GET", f"/workloads/{wl.workload_id}", response=WorkloadStatus)
                 .state.value == "completed", 600, "the workload to complete", every=0.2)
        yield sc
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        serve.stop()


def test_every_row_exactly_once_identical_to_llm_generate(scenario: Scenario, tiny_model: Path) -> None:
    lines = assert_exactly_once_and_identical(scenario.output, expected(tiny_model, N_ROWS, scenario.tmp))
    assert {x["worker_id"] for x in lines} >= {scenario.worker_a}


def test_worker_rode_out_the_service_kill_with_its_engine_loaded(scenario: Scenario) -> None:
    conn = db(scenario.serve.state_dir)
    starts = conn.execute("SELECT COUNT(*) FROM library_events WHERE worker_id=? AND state='ready'",
                          (scenario.worker_a,)).fetchone()[0]
    after = conn.execute("SELECT COUNT(*) FROM rows WHERE worker_id=? AND finished_at>?",
                         (scenario.worker_a, scenario.restarted_at)).fetchone()[0]
    assert starts == 1 and after > 0  # the same worker (no re-registration) went on after the restart


def test_sigterm_keeps_finished_rows_and_requeues_the_rest_within_2s(scenario: Scenario) -> None:
    assert scenario.requeue_seconds <= 2.0, scenario.requeue_seconds
    assert scenario.handed_back > 0  # A really had rows in flight and handed them back
    assert scenario.a_state == "retired"  # it deregistered and exited 0
    conn = db(scenario.serve.state_dir)
    by_a = {r[0] for r in conn.execute("SELECT row_id FROM rows WHERE worker_id=?", (scenario.worker_a,))}
    assert scenario.done_by_a_before_sigterm and scenario.done_by_a_before_sigterm <= by_a  # kept, not redone


def test_no_token_in_any_log_or_state_file(scenario: Scenario) -> None:
    secrets = [scenario.serve.api_token, scenario.serve.pool_token]
    logs = list(scenario.tmp.rglob("*.log"))
    assert len(logs) >= 4  # serve.log, both workers' logs and their library logs
    assert files_containing(scenario.tmp, secrets) == []
