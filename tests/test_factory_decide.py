"""The factory's decisions: given demand, limits and glidein states → submit/remove."""
from __future__ import annotations

from pathlib import Path

from factory.backends.base import Glidein, GlideinState
from factory.daemon import DemandWindow, Policy, decide
from pcm_service.core import ServiceCore
from pcm_service.protocol import ContextState, FactoryLimits, WorkerState, WorkerStatus

NOW = 1_000_000.0


def g(gid: str, state: GlideinState = GlideinState.RUNNING, since: float = NOW) -> Glidein:
    return Glidein(glidein_id=gid, state=state, since=since)


def w(gid: str, inflight: int = 0, idle: float = 100.0,
      state: WorkerState | None = None) -> WorkerStatus:
    return WorkerStatus(worker_id="w" + gid, host="h", glidein_id=gid,
                        state=state or (WorkerState.BUSY if inflight else WorkerState.IDLE),
                        context_id="c", context_state=ContextState.READY, inflight_batches=inflight,
                        rows_done=0, library_starts=1, idle_seconds=0.0 if inflight else idle,
                        last_heartbeat_age=0.0)


P = Policy(per_cycle=4, max_idle=100, idle_grace=5.0, held_timeout=60.0)


def test_submits_up_to_per_cycle() -> None:
    d = decide(10, [g("a")], [w("a", 1)], P, NOW)
    assert (d.submit, d.remove) == (4, [])


def test_idle_cap_limits_what_waits_in_the_queue() -> None:
    queue = [g(f"q{i}", GlideinState.IDLE) for i in range(3)]
    d = decide(20, queue, [], Policy(per_cycle=10, max_idle=5), NOW)
    assert d.submit == 2 and "capped" in d.reason
    held = [g("h", GlideinState.HELD)]
    assert decide(20, queue + held, [], Policy(per_cycle=10, max_idle=5), NOW).submit == 1


def test_steady_when_matching() -> None:
    d = decide(2, [g("a"), g("b")], [], P, NOW)
    assert (d.submit, d.remove) == (0, [])


def test_exited_and_held_glideins_do_not_count() -> None:
    gl = [g("a"), g("b", GlideinState.EXITED), g("c", GlideinState.HELD)]
    assert decide(2, gl, [], P, NOW).submit == 1


def test_held_glidein_removed_after_timeout_only() -> None:
    gl = [g("a"), g("h", GlideinState.HELD, since=NOW - 10)]
    assert decide(1, gl, [], P, NOW).remove == []
    d = decide(1, gl, [], P, NOW + 60)
    assert d.remove == ["h"] and "held" in d.reason


def test_min_above_demand_keeps_workers() -> None:
    """min > demand: the service asks for min even with no work, the factory submits it."""
    d = decide(3, [], [], P, NOW)
    assert d.submit == 3


def test_min_above_demand_from_the_service(tmp_path: Path) -> None:
    core = ServiceCore(tmp_path)
    core.set_factory_limits(FactoryLimits(min_workers=3, max_workers=5))
    assert core.demand().workers_wanted == 3
    core.close()


def test_max_below_running_removes_only_idle_ones() -> None:
    gl = [g("a"), g("b"), g("c")]
    d = decide(1, gl, [w("a", 1), w("b"), w("c")], P, NOW)
    assert sorted(d.remove) == ["b", "c"]
    d = decide(1, gl, [w("a", 1), w("b", 2), w("c")], P, NOW)
    assert d.remove == ["c"] and "busy stay" in d.reason


def test_never_removes_a_busy_starting_or_draining_worker() -> None:
    gl = [g("a"), g("b"), g("c")]
    ws = [w("a", 2), w("b", state=WorkerState.STARTING), w("c", state=WorkerState.DRAINING)]
    assert decide(0, gl, ws, P, NOW).remove == []


def test_removes_queued_then_workerless_then_idle() -> None:
    gl = [g("busy"), g("idle"), g("starting"), g("queued", GlideinState.IDLE)]
    ws = [w("busy", 1), w("idle")]
    assert decide(1, gl, ws, P, NOW).remove == ["queued", "starting", "idle"]
    assert decide(3, gl, ws, P, NOW).remove == ["queued"]


def test_recently_idle_worker_kept() -> None:
    assert decide(0, [g("a")], [w("a", idle=1.0)], P, NOW).remove == []


def test_flapping_demand_submits_once_and_removes_nothing() -> None:
    """Demand 4, 0, 4, 0, … every 5 s: glideins submitted once, kept through the dips."""
    window = DemandWindow(delay=60.0)
    glideins: list[Glidein] = []
    submitted = removed = 0
    for i in range(12):
        now = NOW + 5 * i
        wanted = 4 if i % 2 == 0 else 0
        d = decide(wanted, glideins, [], P, now, keep=window.keep(now, wanted))
        glideins += [g(f"n{submitted + k}") for k in range(d.submit)]
        glideins = [x for x in glideins if x.glidein_id not in d.remove]
        submitted += d.submit
        removed += len(d.remove)
    assert (submitted, removed) == (4, 0)
    # once demand has stayed at 0 for longer than the delay, the idle glideins go
    for t in range(0, 70, 5):
        d = decide(0, glideins, [], P, NOW + 60 + t, keep=window.keep(NOW + 60 + t, 0))
    assert len(d.remove) == 4
