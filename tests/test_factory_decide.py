"""The factory's decision: given demand, glideins and workers → submit/remove."""
from __future__ import annotations

from factory.backends.base import Glidein, GlideinState
from factory.daemon import decide
from pcm_service.protocol import ContextState, WorkerState, WorkerStatus


def g(gid: str, state: GlideinState = GlideinState.RUNNING) -> Glidein:
    return Glidein(gid, state)


def w(gid: str, inflight: int = 0, idle: float = 100.0) -> WorkerStatus:
    return WorkerStatus(worker_id="w" + gid, host="h", glidein_id=gid,
                        state=WorkerState.BUSY if inflight else WorkerState.IDLE, context_id="c",
                        context_state=ContextState.READY, inflight_batches=inflight, rows_done=0,
                        library_starts=1, idle_seconds=0.0 if inflight else idle, last_heartbeat_age=0.0)


def test_submits_up_to_per_cycle() -> None:
    d = decide(wanted=10, per_cycle=4, glideins=[g("a")], workers=[w("a", 1)])
    assert (d.submit, d.remove) == (3 + 1, [])


def test_steady_when_matching() -> None:
    d = decide(wanted=2, per_cycle=4, glideins=[g("a"), g("b")], workers=[])
    assert (d.submit, d.remove) == (0, [])


def test_exited_glideins_do_not_count() -> None:
    d = decide(wanted=2, per_cycle=4, glideins=[g("a"), g("b", GlideinState.EXITED)], workers=[])
    assert d.submit == 1


def test_never_removes_a_busy_worker() -> None:
    d = decide(wanted=0, per_cycle=4, glideins=[g("a"), g("b")], workers=[w("a", 2), w("b", 1)])
    assert d.remove == []


def test_removes_queued_then_workerless_then_idle() -> None:
    gl = [g("busy"), g("idle"), g("starting"), g("queued", GlideinState.IDLE)]
    ws = [w("busy", 1), w("idle")]
    assert decide(1, 4, gl, ws).remove == ["queued", "starting", "idle"]
    assert decide(3, 4, gl, ws).remove == ["queued"]


def test_recently_idle_worker_kept() -> None:
    d = decide(wanted=0, per_cycle=4, glideins=[g("a")], workers=[w("a", idle=1.0)], idle_grace=5.0)
    assert d.remove == []
