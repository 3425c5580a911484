"""The pool follows the queue: `pcm serve` + `pcm factory run --backend local`, real engines.

A large workload raises the worker count to the factory's max (never above it), and when the
queue drains the workers retire on their own (idle timeout) and their glideins go away.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from pcm_service.protocol import ContextState, ServiceStatus, SubmitResponse, WorkloadStatus
from pcm_service.workload import load_workload
from tests.support import REPO
from tests.support.serve import ServeProcess
from tests.support.state import db
from tests.support.waiting import wait_for
from tests.support.workloads import write_engine_workload

pytestmark = pytest.mark.engine
MAX = 3
N_ROWS = 2400


def start_local_factory(tmp: Path, serve: ServeProcess, max_workers: int) -> subprocess.Popen[bytes]:
    (tmp / "factory.yaml").write_text(yaml.safe_dump({
        "service": serve.url, "name": "scaling", "backend": "local", "interval": 1.0,
        "idle_grace": 2.0, "scale_down_delay": 5.0,
        "limits": {"min_workers": 0, "max_workers": max_workers, "per_cycle": max_workers},
        "local": {"work_dir": str(tmp / "glideins"), "token_file": str(serve.pool_token_file)}}))
    with (tmp / "factory.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "pcm_service.cli", "factory", "run", "--config",
                                 str(tmp / "factory.yaml"), "--token-file", str(serve.api_token_file)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

# the run's directory, its service, (live workers, glideins) at each look, the workload's last status
Scaled = tuple[Path, ServeProcess, list[tuple[int, int]], WorkloadStatus]


@pytest.fixture(scope="module")
def scaled(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scaled]:
    tmp = tmp_path_factory.mktemp("scaling")
    sub = load_workload(write_engine_workload(tmp, tiny_model, N_ROWS, batch_size=20))
    serve = ServeProcess(tmp / "state", "--heartbeat-interval", "1", "--idle-timeout", "5").start()
    factory = start_local_factory(tmp, serve, MAX)
    client = serve.client()
    seen: list[tuple[int, int]] = []  # (live workers, glideins in the batch system) at each look

    def look() -> ServiceStatus:
        st = client.request("GET", "/status", response=ServiceStatus)
        seen.append((len(st.workers), sum(g.state.value != "exited" for g in st.glideins)))
        return st

    try:
        wl = client.request("POST", "/workloads", sub, SubmitResponse)
        wait_for(lambda: look().workloads[0].state.value == "completed", 900, "the workload to complete",
                 every=0.2)
        done = client.request("GET", f"/workloads/{wl.workload_id}", response=WorkloadStatus)
        wait_for(lambda: seen[-1] == (0, 0) if look() else False, 120, "every worker and glidein to go",
                 every=0.2)
        print(f"[scaling] peak (workers, glideins) {max(seen)}; {len(seen)} looks", file=sys.stderr)
        yield tmp, serve, seen, done
    finally:
        factory.terminate()
        factory.wait(60)
        serve.stop()


def test_a_large_workload_raises_the_pool_to_max_and_never_above(scaled: Scaled) -> None:
    tmp, serve, seen, done = scaled
    assert done.rows_done == N_ROWS and done.rows_failed == 0
    assert max(w for w, _ in seen) == MAX and max(g for _, g in seen) == MAX, max(seen)
    # from the service's own records: never more than MAX workers registered at once
    spans = db(serve.state_dir).execute("SELECT registered_at, left_at FROM workers").fetchall()
    assert len(spans) >= MAX and all(left is not None for _, left in spans)
    events = sorted([(t, 1) for t, _ in spans] + [(t, -1) for _, t in spans], key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    assert peak == MAX


def test_workers_retire_when_the_queue_drains(scaled: Scaled) -> None:
    tmp, serve, seen, _ = scaled
    states = [r[0] for r in db(serve.state_dir).execute("SELECT state FROM workers")]
    assert states and set(states) == {"retired"}  # left on their own: none lost, none killed
    assert seen[-1] == (0, 0)


def test_two_models_on_two_workers_start_one_engine_each(tiny_model: Path, tmp_path: Path) -> None:
    """Two workloads on two models submitted together to a pool of at most 2: each worker
    loads one model and runs it (2 engine starts; before placement both loaded the model with
    more work, then both switched: 4, one never used)."""
    from pcm_service.cli.tinymodel import make_tiny_model

    other = make_tiny_model(tmp_path / "tiny-llama-b", seed=1)  # other weights: another context
    subs = []
    for name, model, n in (("a", tiny_model, 300), ("b", other, 200)):
        (tmp_path / name).mkdir()
        subs.append(load_workload(write_engine_workload(tmp_path / name, model, n, name=name)))
    serve = ServeProcess(tmp_path / "state", "--heartbeat-interval", "1", "--idle-timeout", "5").start()
    factory = start_local_factory(tmp_path, serve, 2)
    client = serve.client()
    try:
        ids = [client.request("POST", "/workloads", sub, SubmitResponse).workload_id for sub in subs]

        def settled() -> bool:
            st = client.request("GET", "/status", response=ServiceStatus)
            return all(w.state.value == "completed" for w in st.workloads) and not st.workers
        wait_for(settled, 900, "both workloads to complete and the workers to leave", every=0.5)
        done = [client.request("GET", f"/workloads/{i}", response=WorkloadStatus) for i in ids]
        assert [(d.rows_done, d.rows_failed) for d in done] == [(300, 0), (200, 0)]
    finally:
        factory.terminate()
        factory.wait(60)
        serve.stop()
    records = db(serve.state_dir)
    starts = records.execute("SELECT worker_id, context_id FROM library_events WHERE state=?",
                              (ContextState.READY.value,)).fetchall()
    assert len(starts) == 2 and len({c for _, c in starts}) == 2, [tuple(s) for s in starts]
    for worker_id, context_id in starts:  # every engine started ran rows of its own context
        used = records.execute("SELECT COUNT(*) FROM rows r JOIN batches b USING (batch_id)"
                               " WHERE r.worker_id=? AND b.context_id=?", (worker_id, context_id)).fetchone()[0]
        assert used > 0, (worker_id, context_id)
