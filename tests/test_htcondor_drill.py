"""The eviction drill's HTCondor side: the backend vacates (SIGTERM) or fast-vacates (SIGKILL) a
running glidein on the real test pool, and HTCondor runs it again, as a preemption would."""
from __future__ import annotations

from pathlib import Path

import pytest

from factory.backends.htcondor import HTCondorBackend
from factory.config import HTCondorSettings
from pcm_service.protocol import GlideinState
from tests.htcondor_pool.fixtures import PoolHandle
from tests.support.waiting import wait_for

pytestmark = pytest.mark.htcondor

# A stand-in payload that logs each start and each SIGTERM it gets (no worker, no engine).
PAYLOAD = """#!/bin/sh
echo start >> {log}
trap 'echo TERM >> {log}; exit 0' TERM
sleep 600 &
wait $!
"""


def test_evict_vacates_or_kills_a_running_glidein_and_it_runs_again(pool: PoolHandle, tmp_path: Path) -> None:
    pool.schedd()  # reloads the bindings' config: an earlier test may have imported them first
    d = pool.dir(tmp_path.name)
    log = d / "signals.log"
    (d / "payload.sh").write_text(PAYLOAD.format(log=log))
    (d / "payload.sh").chmod(0o755)
    pool.token(d / "pool.token")
    (d / "logs").mkdir()
    (d / "logs").chmod(0o1777)  # the schedd writes the glidein's stdout there as the job owner
    backend = HTCondorBackend(HTCondorSettings(
        log_dir=str(d / "logs"), token_file=str(d / "pool.token"), executable=str(d / "payload.sh"),
        request_memory="64MB", request_disk="10MB"), "http://127.0.0.1:9", f"drill-{tmp_path.name}")
    [gid] = backend.submit(1)
    try:
        def runs() -> list[str]:
            return log.read_text().split() if log.exists() else []

        def running() -> bool:
            return any(g.glidein_id == gid and g.state == GlideinState.RUNNING for g in backend.glideins())

        wait_for(lambda: running() and runs() == ["start"], 120, "the glidein to run")
        backend.evict(gid, hard=False)  # Vacate: SIGTERM, back to the queue, runs again
        wait_for(lambda: runs() == ["start", "TERM", "start"], 120, "SIGTERM, then a second run")
        backend.evict(gid, hard=True)  # VacateFast: SIGKILL (no TERM logged), runs again
        wait_for(lambda: runs() == ["start", "TERM", "start", "start"], 120, "a third run after SIGKILL")
        [ad] = pool.schedd().query(f'ClusterId == {gid.split(".")[0]}', ["JobRunCount"])
        assert ad["JobRunCount"] == 3
    finally:
        backend.remove([gid])
