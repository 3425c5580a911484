"""Random kill -9 of workers mid-workload (the eviction drill of `pcm run`), real vLLM CPU engine.

Each kill costs only the rows in flight: they go back to the queue, replacements load the
context, and every row ends exactly once with the text an undisturbed run gives.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pcm_service.cli.plots import PLOTS, states_over_time
from pcm_service.protocol import LIVE_WORKER_STATES, RunHistory, WorkerState
from tests.support import REPO
from tests.support.state import db, files_containing
from tests.support.workloads import N_REFERENCE, assert_exactly_once_and_identical, expected, write_engine_workload

pytestmark = pytest.mark.engine
N_ROWS = N_REFERENCE
KILLS = 2
# the first kill comes 2 s after the first engine is ready, the second 2 s later: a warm worker
# leases twice its engine's capacity (52 batches of 10 here), so 1,200 rows are all leased soon
# after the second engine is ready, and a later kill would find only idle workers


@pytest.fixture(scope="module")
def drilled_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("churn")
    wl = write_engine_workload(tmp, tiny_model, N_ROWS)
    proc = subprocess.run([sys.executable, "-m", "pcm_service.cli", "run", str(wl), "--workers", "2",
                           "--state-dir", str(tmp / "state"), "--evict-every", "2", "--evict-signal", "kill",
                           "--evict-count", str(KILLS), "--seed", "7"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_every_row_exactly_once_identical_to_an_undisturbed_run(drilled_run: Path, tiny_model: Path) -> None:
    assert_exactly_once_and_identical(drilled_run / "out" / "results.jsonl",
                                      expected(tiny_model, N_ROWS, drilled_run))


def test_the_kills_hit_workers_with_rows_in_flight(drilled_run: Path) -> None:
    conn = db(drilled_run / "state" / "service")
    lost = [r[0] for r in conn.execute("SELECT worker_id FROM workers WHERE state='lost'")]
    assert len(lost) == KILLS
    # the in-flight batches of the killed workers went back to the queue and were finished by others
    requeued = conn.execute("SELECT COUNT(*) FROM batches WHERE losses>0").fetchone()[0]
    assert requeued > 0
    starts = dict(conn.execute("SELECT worker_id, COUNT(*) FROM library_events WHERE state='ready'"
                               " GROUP BY worker_id").fetchall())
    assert set(lost) <= set(starts) and all(n == 1 for n in starts.values())  # killed while warm


def test_no_token_in_any_file_after_the_run(drilled_run: Path) -> None:
    state = drilled_run / "state" / "service"
    secrets = [(state / "api.token").read_text().strip(), (state / "pool.token").read_text().strip()]
    assert files_containing(drilled_run, secrets) == []


def test_the_run_wrote_plots_where_each_eviction_is_a_drop_of_the_pool(drilled_run: Path) -> None:
    report = drilled_run / "state" / "report"
    assert all((report / name).stat().st_size > 10_000 for name in PLOTS) and (report / "index.html").is_file()
    h = RunHistory.model_validate_json((report / "history.json").read_text())
    times, counts = states_over_time(h, lambda c: c.state, LIVE_WORKER_STATES)
    live = [sum(c[i] for c in counts.values()) for i in range(len(times))]
    lost_at = [c.at for c in h.workers if c.state == WorkerState.LOST]
    assert len(lost_at) == KILLS
    drops = [i for i in range(1, len(live)) if live[i] < live[i - 1]]
    assert len(drops) >= KILLS  # each kill, and each retirement at the end, lowers the pool
