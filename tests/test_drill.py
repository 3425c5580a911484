"""The eviction drill picks a random warm worker every interval, and only warm ones."""
from __future__ import annotations

from factory.drill import EvictionDrill, EvictionSettings
from pcm_service.protocol import ContextState, Glidein, GlideinState, WorkerState, WorkerStatus


def worker(wid: str, gid: str, state: WorkerState) -> WorkerStatus:
    return WorkerStatus(worker_id=wid, host="h", glidein_id=gid, state=state, context_id="c",
                        context_state=ContextState.READY, inflight_batches=1, rows_done=0,
                        library_starts=1, idle_seconds=0, last_heartbeat_age=0)


GLIDEINS = [Glidein(glidein_id=g, state=GlideinState.RUNNING) for g in ("g1", "g2", "g3")] + \
    [Glidein(glidein_id="g4", state=GlideinState.IDLE)]
WORKERS = [worker("busy", "g1", WorkerState.BUSY), worker("idle", "g2", WorkerState.IDLE),
           worker("starting", "g3", WorkerState.STARTING), worker("queued?", "g4", WorkerState.BUSY)]


def test_evicts_only_warm_workers_on_running_glideins_once_per_interval() -> None:
    drill = EvictionDrill(EvictionSettings(interval=10, seed=1))
    assert drill.pick(0, GLIDEINS, WORKERS) is None  # the clock starts with the first warm worker
    assert drill.pick(9.9, GLIDEINS, WORKERS) is None  # not due yet
    picked = {drill.pick(10 * k, GLIDEINS, WORKERS).worker_id for k in range(1, 30)}  # type: ignore[union-attr]
    assert picked == {"busy", "idle"}
    assert drill.next_at is not None
    assert drill.pick(drill.next_at - 0.1, GLIDEINS, WORKERS) is None


def test_waits_for_a_warm_worker_and_stops_after_count() -> None:
    drill = EvictionDrill(EvictionSettings(interval=5, count=2, signal="term"))
    cold = [worker("starting", "g3", WorkerState.STARTING)]
    assert drill.pick(6, GLIDEINS, cold) is None  # nobody warm: the clock has not started
    assert drill.pick(7, GLIDEINS, WORKERS) is None  # first warm worker at 7: first eviction at 12
    w = drill.pick(12, GLIDEINS, WORKERS)
    assert w is not None and "eviction drill (1/2): SIGTERM" in drill.decision(12, 2, w).reason
    assert drill.pick(16, GLIDEINS, cold) is None
    assert drill.pick(17, GLIDEINS, WORKERS) is not None
    assert drill.pick(100, GLIDEINS, WORKERS) is None  # count reached
