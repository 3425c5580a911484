"""What a vine_worker sends back is data, never code, and the weights it holds are checked
against PCM's manifest before an engine starts on them (security issue 28, item 5).

The TaskVine tests run the service's real executor (ServiceCore + TaskVineExecutor, a real
Manager) and real `vine_worker` processes whose library is tests/support/vine_trust.py: PCM's
own library functions around an echo engine, made hostile by the worker's environment."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

from pcm_service.core import ServiceConfig, ServiceCore
from pcm_service.executors.vine_answers import UntrustedAnswer, call_answer, loads_plain
from pcm_service.protocol import BatchLease, ContextSpec, RowIn, WorkloadSubmission
from tests.support import REPO
from tests.support.models import fake_model
from tests.support.state import db
from tests.support.taskvine import require_taskvine, stop_vine_worker
from tests.support.waiting import wait_for

VENV_BIN = Path(sys.executable).parent
N = 6


# ----- the decoder alone ----------------------------------------------------------------
def _lease(n: int = 2) -> BatchLease:
    return BatchLease.model_validate({"batch_id": 1, "workload_id": "wl", "context_id": "ctx", "sampling": {},
                                      "rows": [{"idx": i, "row_id": f"r{i}", "prompt": f"p{i}"} for i in range(n)]})


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path: Path) -> None:
    import cloudpickle

    from tests.support.vine_trust import RunsCode

    marker = tmp_path / "pwned"
    raw = cloudpickle.dumps({"Result": RunsCode(str(marker)), "Success": True, "Reason": None})
    with pytest.raises(UntrustedAnswer, match="global"):
        call_answer(raw, _lease(), envelope=True)
    assert not marker.exists()
    pickle.loads(raw)  # what ndcctools' task.output does: the payload is real
    assert marker.exists()


def test_only_plain_data_and_only_the_batchs_rows_pass() -> None:
    answer = json.dumps({"library": {"pid": 7, "context_id": "ctx"},
                         "results": [{"idx": 1, "text": "t", "finish_reason": "stop"}]})
    got = call_answer(pickle.dumps({"Result": answer, "Success": True, "Reason": None}), _lease(), envelope=True)
    assert [r.idx for r in got.results] == [1] and got.library.pid == 7
    assert call_answer(pickle.dumps(answer), _lease(), envelope=False).results == got.results  # a plain task
    assert loads_plain(pickle.dumps([1, (2.0, "x"), {b"k": None}])) == [1, (2.0, "x"), {b"k": None}]
    for bad in (pickle.dumps({"Result": answer, "Success": False, "Reason": "x"}),  # not a success
                pickle.dumps({"Result": {"library": {}, "results": []}, "Success": True}),  # not JSON text
                pickle.dumps({"Result": answer.replace('"idx": 1', '"idx": 9'), "Success": True}),  # not its row
                pickle.dumps({"Result": answer.replace("pid", "code"), "Success": True}),  # unknown field
                pickle.dumps(Path("/")), b"\x80\x05garbage"):
        with pytest.raises(UntrustedAnswer):
            call_answer(bad, _lease(), envelope=True)


# ----- a real Manager and real vine_workers -----------------------------------------------
class Pool:
    """The service's TaskVine executor on a fresh core, and the vine_workers it is given."""

    def __init__(self, tmp: Path) -> None:
        from pcm_service.executors.taskvine import TaskVineExecutor, TaskVineSettings, VineFunctions
        from tests.support import vine_trust
        from worker_image.vine_library import run_batch_cold

        self.tmp = tmp
        self.state = tmp / "state"
        self.model = fake_model(tmp / "model")
        self.core = ServiceCore(self.state, ServiceConfig(model_roots=(tmp,)))
        self.executor = TaskVineExecutor(
            self.core, "a-pool-token-for-taskvine",
            VineFunctions(vine_trust.load_engine, vine_trust.run_batch, run_batch_cold),
            TaskVineSettings(port=0, engine="echo", calls_per_worker=1))
        self.workers: list[subprocess.Popen[bytes]] = []
        self.starts = tmp / "starts.jsonl"

    def submit(self) -> str:
        sub = WorkloadSubmission(name="trust", context=ContextSpec(model=str(self.model)), batch_size=2,
                                 output=str(self.tmp / "out" / "r.jsonl"),
                                 rows=[RowIn(row_id=f"id{i}", prompt=f"p{i}") for i in range(N)])
        wl = self.core.submit(sub).workload_id
        self.executor.start()
        return wl

    def worker(self, name: str, hostname: Optional[str] = None, **env: str) -> None:
        """A vine_worker; with ``hostname`` in its own user and UTS namespaces, so it is
        another host to TaskVine (whose blocklist is per host)."""
        argv = [str(VENV_BIN / "vine_worker"), "--password", str(self.executor.password_file), "--cores", "1",
                "--memory", "1000", "--disk", "2000", "--timeout", "60", "--workdir", str(self.tmp / name),
                "127.0.0.1", str(self.executor.port)]
        if hostname:
            argv = ["unshare", "--user", "--map-root-user", "--uts", "sh", "-c",
                    f'hostname {hostname} && exec "$@"', "sh", *argv]
        full = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
                "PCM_TEST_STARTS": str(self.starts), **env}
        (self.tmp / name).mkdir()
        self.workers.append(subprocess.Popen(argv, env=full, stdout=(self.tmp / f"{name}.log").open("wb"),
                                             stderr=subprocess.STDOUT))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in self.tmp.glob("*.log"))

    def wait_done(self, wl: str) -> None:
        wait_for(lambda: self.core.workload_status(wl).rows_done == N, 120,
                 f"every row answered\n{self.logs()}")

    def close(self) -> None:
        for w in self.workers:
            stop_vine_worker(w)
        self.executor.stop()
        self.core.close()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    require_taskvine()
    p = Pool(tmp_path)
    yield p
    p.close()


def _rows(state: Path) -> list[dict[str, object]]:
    with db(state) as conn:
        return [dict(r) for r in conn.execute("SELECT r.idx, r.text, r.crashes, w.host FROM rows r"
                                              " JOIN workers w USING (worker_id) ORDER BY r.idx")]


def test_a_worker_whose_answer_would_run_code_is_refused_blocked_and_its_batch_runs_elsewhere(
        pool: Pool) -> None:
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--user", "--map-root-user", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --user --uts: two hosts for TaskVine on one machine")
    pwned = pool.tmp / "pwned"
    wl = pool.submit()
    pool.worker("evil", hostname="evil-host.local", PCM_TEST_PWNED=str(pwned))
    with db(pool.state) as conn:  # the hostile worker alone answers first: its call crashed
        wait_for(lambda: conn.execute("SELECT SUM(crashes) FROM rows").fetchone()[0], 60,
                 f"the hostile worker's answer\n{pool.logs()}")
    pool.worker("honest")
    pool.wait_done(wl)
    assert not pwned.exists()  # the service never ran the answer's code
    rows = _rows(pool.state)
    assert [r["text"] for r in rows] == [f"p{i}" for i in range(N)]
    assert {r["host"] for r in rows} != {"evil-host.local"} and "evil-host.local" not in {r["host"] for r in rows}
    assert sum(int(str(r["crashes"])) for r in rows) >= 1  # the refused call counted as crashed
    with db(pool.state) as conn:
        evil = conn.execute("SELECT state FROM workers WHERE host='evil-host.local'").fetchall()
    assert evil and all(e["state"] == "retired" for e in evil)


def test_weights_altered_on_a_worker_are_refused_before_the_engine_loads_them(pool: Pool) -> None:
    """The refusal and the service's answer to it (every cached copy pruned, the library
    reinstalled). That the rows then finish is not asserted: TaskVine 7.17.1's worker can hang
    killing the refused library (it sets the library's process group from the parent only)."""
    poison = pool.tmp / "poison-once"
    poison.touch()
    pool.submit()
    pool.worker("w1", PCM_TEST_POISON=str(poison))
    with db(pool.state) as conn:
        failed = wait_for(lambda: conn.execute("SELECT error FROM library_events WHERE state='failed'").fetchall(),
                          60, f"the library's refusal\n{pool.logs()}")
    assert not poison.exists()  # the library's copy was altered before it checked it
    assert "model refused: model.safetensors" in failed[0]["error"]
    wait_for(lambda: pool.executor.refused, 30, "the service to drop the copies")
    # no engine ever started on the altered copy (one on the weights fetched again may have)
    starts = pool.starts.read_text().splitlines() if pool.starts.exists() else []
    assert all(json.loads(x)["weights"] == "not really weights" for x in starts), starts
