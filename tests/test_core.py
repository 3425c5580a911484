"""ServiceCore driven directly: leasing, exactly-once results, requeue, output order."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from pcm_service.core import ServiceConfig, ServiceCore, UnknownWorker
from pcm_service.protocol import (
    BatchLease,
    BatchReport,
    ContextSpec,
    ContextState,
    FactoryLimits,
    Heartbeat,
    HeartbeatResponse,
    LeaseRequest,
    LibraryEvent,
    RowIn,
    RowResult,
    WorkerRegistration,
    WorkerState,
    WorkloadState,
    WorkloadSubmission,
)
from tests.support.clock import FakeClock, clock_of
from tests.support.models import fake_model


def submission(tmp_path: Path, n: int = 7, batch_size: int = 3) -> WorkloadSubmission:
    model = fake_model(tmp_path / "model")
    return WorkloadSubmission(
        name="t", context=ContextSpec(model=str(model)), batch_size=batch_size,
        output=str(tmp_path / "out" / "r.jsonl"),
        rows=[RowIn(row_id=f"id{i}", prompt=f"p{i}") for i in range(n)])


def ready_worker(core: ServiceCore, ctx: str) -> str:
    wid = core.register(WorkerRegistration(host="h", pid=1)).worker_id
    core.library_event(wid, LibraryEvent(context_id=ctx, state=ContextState.READY, seconds=1.0))
    return wid


def lease(core: ServiceCore, wid: str, ctx: str, n: int = 1) -> list[BatchLease]:
    return core.lease_batch(wid, LeaseRequest(context_id=ctx, context_state=ContextState.READY,
                                              max_batches=n)).batches


def ok(idx: int, text: str = "t") -> RowResult:
    return RowResult(idx=idx, text=f"{text}{idx}", finish_reason="length", prompt_tokens=2,
                     completion_tokens=3)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ServiceCore]:
    c = ServiceCore(tmp_path / "state", ServiceConfig(worker_timeout=10, model_roots=(tmp_path,)), clock=FakeClock())
    yield c
    c.close()


def test_cold_worker_is_told_which_context_to_load(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path))
    wid = core.register(WorkerRegistration(host="h", pid=1)).worker_id
    r = core.lease_batch(wid, LeaseRequest(max_batches=0))
    assert r.batches == [] and r.assign_context is not None
    assert r.assign_context.context_id == resp.context_id


def test_full_cycle_writes_output_in_input_order(core: ServiceCore, tmp_path: Path) -> None:
    sub = submission(tmp_path)
    resp = core.submit(sub)
    assert (resp.rows, resp.batches) == (7, 3)
    wid = ready_worker(core, resp.context_id)
    leases = lease(core, wid, resp.context_id, n=5)
    assert [len(b.rows) for b in leases] == [3, 3, 1]
    for b in reversed(leases):  # finish out of order
        for r in reversed(b.rows):
            core.report(wid, BatchReport(batch_id=b.batch_id, results=[ok(r.idx)]))
    st = core.workload_status(resp.workload_id)
    assert st.state == WorkloadState.COMPLETED and st.rows_done == 7
    lines = [json.loads(x) for x in Path(sub.output).read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"id{i}" for i in range(7)]
    assert [x["text"] for x in lines] == [f"t{i}" for i in range(7)]
    assert all(x["worker_id"] == wid and x["error"] is None for x in lines)


def test_duplicate_results_are_dropped(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=3))
    wid = ready_worker(core, resp.context_id)
    [b] = lease(core, wid, resp.context_id)
    first = core.report(wid, BatchReport(batch_id=b.batch_id, results=[ok(0, "first")]))
    again = core.report(wid, BatchReport(batch_id=b.batch_id, results=[ok(0, "second"), ok(1)]))
    assert (first.accepted, again.accepted, again.duplicates) == (1, 1, 1)
    assert core.workload_status(resp.workload_id).rows_done == 2


def test_returned_rows_are_leased_again_without_finished_ones(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=3))
    w1, w2 = ready_worker(core, resp.context_id), ready_worker(core, resp.context_id)
    [b] = lease(core, w1, resp.context_id)
    core.report(w1, BatchReport(batch_id=b.batch_id, results=[ok(0)], returned=[1, 2]))
    [again] = lease(core, w2, resp.context_id)
    assert again.batch_id == b.batch_id and [r.idx for r in again.rows] == [1, 2]


def test_lost_worker_batches_requeued(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=3))
    w1 = ready_worker(core, resp.context_id)
    [b] = lease(core, w1, resp.context_id)
    w2 = ready_worker(core, resp.context_id)
    assert lease(core, w2, resp.context_id) == []
    clock_of(core).t += 11  # w1 stays silent past worker_timeout (10 s); w2 heartbeats
    from pcm_service.protocol import Heartbeat
    core.heartbeat(w2, Heartbeat(context_id=resp.context_id, context_state=ContextState.READY))
    assert core.reap() == [w1]
    with pytest.raises(UnknownWorker):
        core.heartbeat(w1, Heartbeat())
    [again] = lease(core, w2, resp.context_id)
    assert again.batch_id == b.batch_id


def test_leases_and_reports_keep_a_busy_worker_alive_without_heartbeats(core: ServiceCore, tmp_path: Path) -> None:
    """A busy agent heartbeats seldom (WorkerAgent._heartbeat_due): its leases and reports show
    the service it is alive; a worker that makes no call at all is still lost."""
    resp = core.submit(submission(tmp_path, n=9))
    busy, silent = ready_worker(core, resp.context_id), ready_worker(core, resp.context_id)
    [b] = lease(core, busy, resp.context_id)
    clock_of(core).t += 8
    core.report(busy, BatchReport(batch_id=b.batch_id, results=[ok(r.idx) for r in b.rows]))
    clock_of(core).t += 8  # 16 s since either heartbeat; the busy one reported 8 s ago
    assert core.reap() == [silent]
    [b2] = lease(core, busy, resp.context_id)
    clock_of(core).t += 8  # its lease is 8 s old, its report 16 s
    assert core.reap() == []
    clock_of(core).t += 3
    assert core.reap() == [busy]


def test_batch_whose_worker_is_lost_repeatedly_ends_with_error_rows(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=2, batch_size=2))
    for _ in range(core.config.max_losses):
        w = ready_worker(core, resp.context_id)
        assert len(lease(core, w, resp.context_id)) == 1
        core.retire(w, WorkerState.LOST)
    w = ready_worker(core, resp.context_id)
    assert lease(core, w, resp.context_id) == []
    st = core.workload_status(resp.workload_id)
    assert st.state == WorkloadState.COMPLETED and st.rows_failed == 2
    assert "lost 50 times" in json.loads(Path(st.output).read_text().splitlines()[0])["error"]


def test_rows_handed_back_on_eviction_are_never_counted_against_the_batch(core: ServiceCore, tmp_path: Path) -> None:
    """Evictions (SIGTERM: rows returned; a worker leaving: batches requeued) can happen any
    number of times: the rows still end with their real result, not an error."""
    resp = core.submit(submission(tmp_path, n=2, batch_size=2))
    for _ in range(3 * core.config.max_losses):
        w = ready_worker(core, resp.context_id)
        [b] = lease(core, w, resp.context_id)
        core.report(w, BatchReport(batch_id=b.batch_id, returned=[0, 1]))
        [b] = lease(core, w, resp.context_id)
        core.retire(w)  # left cleanly (deregistered) with the batch leased
    w = ready_worker(core, resp.context_id)
    [b] = lease(core, w, resp.context_id)
    core.report(w, BatchReport(batch_id=b.batch_id, results=[ok(0), ok(1)]))
    st = core.workload_status(resp.workload_id)
    assert st.state == WorkloadState.COMPLETED and st.rows_failed == 0


def test_row_in_flight_at_two_library_crashes_is_poisoned_others_retried(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=3, batch_size=3))
    w = ready_worker(core, resp.context_id)
    [b] = lease(core, w, resp.context_id)
    core.report(w, BatchReport(batch_id=b.batch_id, results=[ok(0)], crashed=[1, 2]))
    [b] = lease(core, w, resp.context_id)
    assert [r.idx for r in b.rows] == [1, 2]  # requeued after one crash
    core.report(w, BatchReport(batch_id=b.batch_id, crashed=[2], returned=[1]))
    [b] = lease(core, w, resp.context_id)
    assert [r.idx for r in b.rows] == [1]  # row 2 is poisoned; row 1 was only handed back
    core.report(w, BatchReport(batch_id=b.batch_id, results=[ok(1)]))
    st = core.workload_status(resp.workload_id)
    assert st.state == WorkloadState.COMPLETED and st.rows_failed == 1
    lines = [json.loads(x) for x in Path(st.output).read_text().splitlines()]
    assert [x["text"] for x in lines[:2]] == ["t0", "t1"] and "poisoned" in lines[2]["error"]


def hb(core: ServiceCore, wid: str, ctx: str, batches: list[int], seq: int, inflight: int = 0) -> HeartbeatResponse:
    return core.heartbeat(wid, Heartbeat(context_id=ctx, context_state=ContextState.READY,
                                         inflight_batches=inflight, batches=batches, lease_seq=seq))


def test_heartbeat_requeues_leases_the_worker_saw_but_no_longer_holds(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=9, batch_size=3))
    w = ready_worker(core, resp.context_id)
    r1 = core.lease_batch(w, LeaseRequest(context_id=resp.context_id, context_state=ContextState.READY,
                                          max_batches=2))
    r2 = core.lease_batch(w, LeaseRequest(context_id=resp.context_id, context_state=ContextState.READY,
                                          max_batches=1))
    (a, b), (c,) = r1.batches, r2.batches
    assert r2.lease_seq == r1.lease_seq + 1
    # the worker has taken in only the first response and lost b's report: b goes back;
    # c was leased in a response it has not seen yet, so it stays leased
    hb(core, w, resp.context_id, [a.batch_id], r1.lease_seq, inflight=1)
    other = ready_worker(core, resp.context_id)
    assert [x.batch_id for x in lease(core, other, resp.context_id, n=3)] == [b.batch_id]
    hb(core, w, resp.context_id, [a.batch_id, c.batch_id], r2.lease_seq, inflight=2)
    assert lease(core, other, resp.context_id, n=3) == []


def test_heartbeat_holding_nothing_requeues_every_lease_it_saw(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=3, batch_size=3))
    w = ready_worker(core, resp.context_id)
    r = core.lease_batch(w, LeaseRequest(context_id=resp.context_id, context_state=ContextState.READY,
                                         max_batches=1))
    # its only batch's report was lost for good: it holds nothing, yet has seen that lease
    hb(core, w, resp.context_id, [], r.lease_seq, inflight=0)
    other = ready_worker(core, resp.context_id)
    assert [x.batch_id for x in lease(core, other, resp.context_id)] == [r.batches[0].batch_id]


def test_worker_of_an_exited_glidein_is_lost_at_once(core: ServiceCore, tmp_path: Path) -> None:
    from pcm_service.protocol import FactoryReport, Glidein, GlideinState
    resp = core.submit(submission(tmp_path, n=3))
    w = core.register(WorkerRegistration(host="h", pid=1, glidein_id="7.0")).worker_id
    core.library_event(w, LibraryEvent(context_id=resp.context_id, state=ContextState.READY))
    [b] = lease(core, w, resp.context_id)
    gone = Glidein(glidein_id="7.0", state=GlideinState.EXITED, detail="killed")
    assert core.factory_report(FactoryReport(factory="f", backend="local", at=1.0, glideins=[gone])) == [w]
    with pytest.raises(UnknownWorker):
        core.heartbeat(w, Heartbeat())
    [again] = lease(core, ready_worker(core, resp.context_id), resp.context_id)
    assert again.batch_id == b.batch_id


def test_idle_worker_retires_unless_the_factory_minimum_keeps_it(core: ServiceCore, tmp_path: Path) -> None:
    from pcm_service.protocol import IdleReport
    resp = core.submit(submission(tmp_path, n=3))
    a, b = ready_worker(core, resp.context_id), ready_worker(core, resp.context_id)
    core.set_factory_limits(FactoryLimits(min_workers=1, max_workers=4))
    first = core.idle(a, IdleReport(idle_seconds=61))
    second = core.idle(b, IdleReport(idle_seconds=61))
    assert first.retire and not second.retire and "minimum 1" in second.reason
    assert lease(core, a, resp.context_id) == []  # retiring: given no new work
    core.set_factory_limits(FactoryLimits(min_workers=0, max_workers=4))
    assert core.idle(b, IdleReport(idle_seconds=61)).retire


def test_engine_that_never_starts_fails_rows_instead_of_looping(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=4))
    for _ in range(core.config.max_attempts):
        w = core.register(WorkerRegistration(host="h", pid=1)).worker_id
        core.library_event(w, LibraryEvent(context_id=resp.context_id, state=ContextState.FAILED,
                                           error="CUDA out of memory"))
    st = core.workload_status(resp.workload_id)
    assert st.state == WorkloadState.COMPLETED and st.rows_failed == 4
    line = json.loads(Path(st.output).read_text().splitlines()[0])
    assert "CUDA out of memory" in line["error"]


def test_library_starts_counted_per_worker(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path))
    w = ready_worker(core, resp.context_id)
    assert core.library_starts() == {w: 1}


def test_demand_follows_work_and_limits(core: ServiceCore, tmp_path: Path) -> None:
    assert core.demand().workers_wanted == 0
    core.set_factory_limits(FactoryLimits(min_workers=0, max_workers=3))
    core.submit(submission(tmp_path, n=30, batch_size=1))  # 30 batches, nothing measured: 4 per worker
    d = core.demand()
    assert (d.raw, d.workers_wanted, d.rows_left) == (8, 3, 30) and "limits [0, 3]" in d.reason
    core.set_factory_limits(FactoryLimits(min_workers=5, max_workers=10))
    d = core.demand()  # growth is damped (+4 or x2 per 15 s); the minimum applies at once
    assert (d.raw, d.workers_wanted) == (8, 5) and "damped to 4" in d.reason
    clock_of(core).t += 15
    assert core.demand().workers_wanted == 8


def test_demand_uses_measured_throughput_and_time_to_ready(core: ServiceCore, tmp_path: Path) -> None:
    """One worker, ready 40 s after registering, runs 2 rows/s: 400 rows are 200 worker·s, so
    newcomers (ready after 40 s, each to work >= 40 s) are worth (200 - 2*40*1) / 40 = 3 more."""
    core.set_factory_limits(FactoryLimits(min_workers=0, max_workers=100))
    resp = core.submit(submission(tmp_path, n=420, batch_size=10))
    w = core.register(WorkerRegistration(host="h", pid=1)).worker_id
    clock_of(core).t += 40
    core.library_event(w, LibraryEvent(context_id=resp.context_id, state=ContextState.READY))
    core.heartbeat(w, Heartbeat(context_id=resp.context_id, context_state=ContextState.READY))
    [b, b2] = lease(core, w, resp.context_id, n=2)
    for i, r in enumerate(b.rows + b2.rows):  # 20 rows over 10 s
        clock_of(core).t += 0.5
        core.report(w, BatchReport(batch_id=b.batch_id if i < 10 else b2.batch_id, results=[ok(r.idx)]))
    d = core.demand()
    assert d.rows_per_worker_second == pytest.approx(2.0) and d.time_to_ready == pytest.approx(40)
    assert d.ready_measured and d.rows_left == 400 and d.raw == 1 + 3, d.reason
    assert "400 rows left at 2.00 rows/s" in d.reason


def test_workers_beyond_max_are_told_to_retire_busy_ones_last(core: ServiceCore, tmp_path: Path) -> None:
    """`pcm factory set --max 1` with 3 workers: the two least busy (newest first) retire."""
    wl = core.submit(submission(tmp_path, n=9, batch_size=3))
    busy = ready_worker(core, wl.context_id)
    lease(core, busy, wl.context_id)
    idle = [ready_worker(core, wl.context_id) for _ in range(2)]

    def hb(wid: str, inflight: int = 0) -> bool:
        return core.heartbeat(wid, Heartbeat(context_id=wl.context_id, context_state=ContextState.READY,
                                             inflight_batches=inflight)).retire

    assert not any([hb(busy, 1), *map(hb, idle)])  # no limits set: nobody manages the pool
    core.set_factory_limits(FactoryLimits(max_workers=3))
    assert not any([hb(busy, 1), *map(hb, idle)])
    core.set_factory_limits(FactoryLimits(max_workers=1))
    assert (hb(busy, 1), [hb(w) for w in idle]) == (False, [True, True])
    # told once, they count as leaving at once: the last one is never told too, even when it
    # looks idlest before the others' next heartbeats say they are draining
    assert not hb(busy, 0)
    draining = core.heartbeat(idle[0], Heartbeat(context_id=wl.context_id, draining=True,
                                                 context_state=ContextState.READY))
    assert not draining.retire  # already leaving: not counted, not told twice


def test_surplus_workers_are_told_once_and_never_all(core: ServiceCore, tmp_path: Path) -> None:
    wl = core.submit(submission(tmp_path, n=9, batch_size=3))
    a, b, c = [ready_worker(core, wl.context_id) for _ in range(3)]
    with core.store.transaction() as db:  # c is the newest: among equally busy ones the newest go first
        db.execute("UPDATE workers SET registered_at=registered_at+? WHERE worker_id=?", (2, c))
        db.execute("UPDATE workers SET registered_at=registered_at+? WHERE worker_id=?", (1, b))

    def hb(wid: str, inflight: int) -> bool:
        return core.heartbeat(wid, Heartbeat(context_id=wl.context_id, context_state=ContextState.READY,
                                             inflight_batches=inflight)).retire

    for w in (a, b, c):
        hb(w, 3)
    core.set_factory_limits(FactoryLimits(max_workers=1))
    told = [hb(c, 3), hb(b, 3), hb(a, 3), hb(c, 0)]  # c finished its batches in between
    assert told == [True, True, False, False]


def test_factory_limits_validated() -> None:
    with pytest.raises(ValueError, match="max_workers .* is below min_workers"):
        FactoryLimits(min_workers=3, max_workers=1)


def test_state_survives_reopen(tmp_path: Path) -> None:
    core = ServiceCore(tmp_path / "s", ServiceConfig(model_roots=(tmp_path,)))
    resp = core.submit(submission(tmp_path))
    w = ready_worker(core, resp.context_id)
    [b] = lease(core, w, resp.context_id)
    core.report(w, BatchReport(batch_id=b.batch_id, results=[ok(0)]))
    core.close()
    core = ServiceCore(tmp_path / "s", ServiceConfig(model_roots=(tmp_path,)))
    st = core.workload_status(resp.workload_id)
    assert (st.rows_total, st.rows_done) == (7, 1)
    core.close()


def test_reports_of_several_batches_are_one_transaction(core: ServiceCore, tmp_path: Path) -> None:
    resp = core.submit(submission(tmp_path, n=6, batch_size=3))
    wid = ready_worker(core, resp.context_id)
    a, b = lease(core, wid, resp.context_id, n=2)
    r = core.report(wid, BatchReport(batch_id=a.batch_id, results=[ok(i) for i in (0, 1, 2)]),
                    BatchReport(batch_id=b.batch_id, results=[ok(3), ok(4)]))
    assert (r.accepted, r.duplicates) == (5, 0)
    with pytest.raises(LookupError):  # one unknown batch: nothing of the request is recorded
        core.report(wid, BatchReport(batch_id=b.batch_id, results=[ok(5)]), BatchReport(batch_id=999))
    st = core.workload_status(resp.workload_id)
    assert st.rows_done == 5
    again = core.report(wid, BatchReport(batch_id=a.batch_id, results=[ok(0, "late")]),
                        BatchReport(batch_id=b.batch_id, results=[ok(5)]))
    assert (again.accepted, again.duplicates) == (1, 1)
    assert core.workload_status(resp.workload_id).state == WorkloadState.COMPLETED
