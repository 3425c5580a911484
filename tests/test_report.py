"""`pcm report`: a run over time from the service's records, plotted (PNGs and index.html)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pcm_service.cli.plots import PLOTS, states_over_time
from pcm_service.protocol import ContextState, RunHistory, WorkerState
from tests.support.pool import watched_pool
from tests.support.serve import ServeProcess


def test_history_records_every_state_change_engine_start_and_row(serve: ServeProcess, tmp_path: Path) -> None:
    pool = watched_pool(serve, tmp_path)
    h: RunHistory = serve.client().request("GET", "/history", response=RunHistory)
    busy, loading, failed = pool.workers
    path = [(c.state, c.context_state) for c in h.workers if c.worker_id == busy]
    assert path[0] == (WorkerState.STARTING, ContextState.ABSENT) and path[-1] == (WorkerState.BUSY, ContextState.READY)
    assert [c.context_state for c in h.workers if c.worker_id == failed][-1] == ContextState.FAILED
    assert sorted((e.worker_id, e.ok) for e in h.engines) == sorted([(busy, True), (failed, False)])
    assert sum(r.rows for r in h.rows) == 120 and all(h.start <= r.at <= h.end for r in h.rows)
    times, counts = states_over_time(h, lambda c: c.state, WorkerState)
    assert (counts[WorkerState.BUSY][-1], counts[WorkerState.STARTING][-1], counts[WorkerState.IDLE][-1]) == (1, 1, 1)
    one = serve.client().request("GET", "/history", response=RunHistory, workload_id=pool.workloads[1].workload_id)
    assert [w.name for w in one.workloads] == ["summaries"] and one.rows == []
    assert loading in {c.worker_id for c in one.workers}  # the pool is shared: its workers are shown


def test_pcm_report_writes_the_plots_and_an_index(serve: ServeProcess, tmp_path: Path) -> None:
    watched_pool(serve, tmp_path)
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "-m", "pcm_service.cli", "report", "-o", str(out), "--service", serve.url],
                         env={**os.environ, "PCM_API_TOKEN_FILE": str(serve.api_token_file)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert str(out / "index.html") in res.stdout
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    index = (out / "index.html").read_text()
    assert all(f'src="{name}"' in index for name in PLOTS)
    assert "fact-check" in index and "120/2000" in index and "summaries" in index
    assert "<th>engine starts</th><td>1 (1 failed)</td>" in index
    bad = subprocess.run([sys.executable, "-m", "pcm_service.cli", "report", "wl-nosuch", "-o", str(tmp_path / "x"),
                          "--service", serve.url], env={**os.environ, "PCM_API_TOKEN_FILE": str(serve.api_token_file)},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown workload wl-nosuch" in bad.stdout + bad.stderr
    assert not (tmp_path / "x").exists()
