"""ServiceCore driven directly: leasing, exactly-once results, requeue, output order."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcm_service.core import ServiceConfig, ServiceCore, UnknownWorker
from pcm_service.protocol import (
    BatchReport,
    ContextSpec,
    ContextState,
    FactoryLimits,
    Heartbeat,
    LeaseRequest,
    LibraryEvent,
    RowIn,
    RowResult,
    WorkerRegistration,
    WorkloadState,
    WorkloadSubmission,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def submission(tmp_path: Path, n: int = 7, batch_size: int = 3) -> WorkloadSubmission:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return WorkloadSubmission(
        name="t", context=ContextSpec(model=str(model)), batch_size=batch_size,
        output=str(tmp_path / "out" / "r.jsonl"),
        rows=[RowIn(row_id=f"id{i}", prompt=f"p{i}") for i in range(n)])


def ready_worker(core: ServiceCore, ctx: str) -> str:
    wid = core.register(WorkerRegistration(host="h", pid=1)).worker_id
    core.library_event(wid, LibraryEvent(context_id=ctx, state=ContextState.READY, seconds=1.0))
    return wid


def lease(core: ServiceCore, wid: str, ctx: str, n: int = 1):  # type: ignore[no-untyped-def]
    return core.lease_batch(wid, LeaseRequest(context_id=ctx, context_state=ContextState.READY,
                                              max_batches=n)).batches


def ok(idx: int, text: str = "t") -> RowResult:
    return RowResult(idx=idx, text=f"{text}{idx}", finish_reason="length", prompt_tokens=2,
                     completion_tokens=3)


@pytest.fixture
def core(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = ServiceCore(tmp_path / "state", ServiceConfig(worker_timeout=10), clock=Clock())
    yield c
    c.close()


def test_cold_worker_is_told_which_context_to_load(core, tmp_path) -> None:
    resp = core.submit(submission(tmp_path))
    wid = core.register(WorkerRegistration(host="h", pid=1)).worker_id
    r = core.lease_batch(wid, LeaseRequest(max_batches=0))
    assert r.batches == [] and r.assign_context is not None
    assert r.assign_context.context_id == resp.context_id


def test_full_cycle_writes_output_in_input_order(core, tmp_path) -> None:
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


def test_duplicate_results_are_dropped(core, tmp_path) -> None:
    resp = core.submit(submission(tmp_path, n=3))
    wid = ready_worker(core, resp.context_id)
    [b] = lease(core, wid, resp.context_id)
    first = core.report(wid, BatchReport(batch_id=b.batch_id, results=[ok(0, "first")]))
    again = core.report(wid, BatchReport(batch_id=b.batch_id, results=[ok(0, "second"), ok(1)]))
    assert (first.accepted, again.accepted, again.duplicates) == (1, 1, 1)
    assert core.workload_status(resp.workload_id).rows_done == 2


def test_returned_rows_are_leased_again_without_finished_ones(core, tmp_path) -> None:
    resp = core.submit(submission(tmp_path, n=3))
    w1, w2 = ready_worker(core, resp.context_id), ready_worker(core, resp.context_id)
    [b] = lease(core, w1, resp.context_id)
    core.report(w1, BatchReport(batch_id=b.batch_id, results=[ok(0)], returned=[1, 2]))
    [again] = lease(core, w2, resp.context_id)
    assert again.batch_id == b.batch_id and [r.idx for r in again.rows] == [1, 2]


def test_lost_worker_batches_requeued(core, tmp_path) -> None:
    resp = core.submit(submission(tmp_path, n=3))
    w1 = ready_worker(core, resp.context_id)
    [b] = lease(core, w1, resp.context_id)
    w2 = ready_worker(core, resp.context_id)
    assert lease(core, w2, resp.context_id) == []
    core.clock.t += 11  # w1 stays silent past worker_timeout (10 s); w2 heartbeats
    from pcm_service.protocol import Heartbeat
    core.heartbeat(w2, Heartbeat(context_id=resp.context_id, context_state=ContextState.READY))
    assert core.reap() == [w1]
    with pytest.raises(UnknownWorker):
        core.heartbeat(w1, Heartbeat())
    [again] = lease(core, w2, resp.context_id)
    assert again.batch_id == b.batch_id


def test_batch_failing_repeatedly_ends_with_error_rows(core, tmp_path) -> None:
    resp = core.submit(submission(tmp_path, n=2, batch_size=2))
    for _ in range(core.config.max_attempts):
        w = ready_worker(core, resp.context_id)
        assert len(lease(core, w, resp.context_id)) == 1
        core.retire(w)
    w = ready_worker(core, resp.context_id)
    assert lease(core, w, resp.context_id) == []
    st = core.workload_status(resp.workload_id)
    assert st.state == WorkloadState.COMPLETED and st.rows_failed == 2


def test_engine_that_never_starts_fails_rows_instead_of_looping(core, tmp_path) -> None:
    resp = core.submit(submission(tmp_path, n=4))
    for _ in range(core.config.max_attempts):
        w = core.register(WorkerRegistration(host="h", pid=1)).worker_id
        core.library_event(w, LibraryEvent(context_id=resp.context_id, state=ContextState.FAILED,
                                           error="CUDA out of memory"))
    st = core.workload_status(resp.workload_id)
    assert st.state == WorkloadState.COMPLETED and st.rows_failed == 4
    line = json.loads(Path(st.output).read_text().splitlines()[0])
    assert "CUDA out of memory" in line["error"]


def test_library_starts_counted_per_worker(core, tmp_path) -> None:
    resp = core.submit(submission(tmp_path))
    w = ready_worker(core, resp.context_id)
    assert core.library_starts() == {w: 1}


def test_demand_follows_work_and_limits(core, tmp_path) -> None:
    assert core.demand().workers_wanted == 0
    core.set_factory_limits(FactoryLimits(min_workers=0, max_workers=3))
    core.submit(submission(tmp_path, n=30, batch_size=1))  # 30 batches, 4 per worker → 8, clamped
    assert core.demand().workers_wanted == 3
    core.set_factory_limits(FactoryLimits(min_workers=5, max_workers=10))
    assert core.demand().workers_wanted == 8


def test_workers_beyond_max_are_told_to_retire_busy_ones_last(core, tmp_path) -> None:
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
    draining = core.heartbeat(idle[0], Heartbeat(context_id=wl.context_id, draining=True,
                                                 context_state=ContextState.READY))
    assert not draining.retire  # already leaving: not counted, not told twice


def test_factory_limits_validated() -> None:
    with pytest.raises(ValueError, match="max_workers .* is below min_workers"):
        FactoryLimits(min_workers=3, max_workers=1)


def test_state_survives_reopen(tmp_path) -> None:
    core = ServiceCore(tmp_path / "s")
    resp = core.submit(submission(tmp_path))
    w = ready_worker(core, resp.context_id)
    [b] = lease(core, w, resp.context_id)
    core.report(w, BatchReport(batch_id=b.batch_id, results=[ok(0)]))
    core.close()
    core = ServiceCore(tmp_path / "s")
    st = core.workload_status(resp.workload_id)
    assert (st.rows_total, st.rows_done) == (7, 1)
    core.close()
