"""Context placement across models, driven on ServiceCore with a hand-set clock: workers spread
over the contexts with work, a start is only made where it will pay, cached models first."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from pcm_service.core import ServiceConfig, ServiceCore
from pcm_service.core.demand import DemandPolicy
from pcm_service.core.placement import ContextWork, choose_context
from pcm_service.protocol import (
    BatchReport,
    BatchState,
    ContextSpec,
    ContextState,
    LeaseRequest,
    LibraryEvent,
    RowIn,
    RowResult,
    WorkerRegistration,
    WorkloadSubmission,
)
from tests.support.clock import FakeClock, clock_of
from tests.support.models import fake_model


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ServiceCore]:
    c = ServiceCore(tmp_path / "state", ServiceConfig(worker_timeout=600, model_roots=(tmp_path,)), clock=FakeClock())
    yield c
    c.close()


def submit(core: ServiceCore, tmp_path: Path, name: str, n: int, batch_size: int = 10) -> str:
    model = fake_model(tmp_path / name)
    (model / "name.txt").write_text(name)  # another model: another digest, another context
    return core.submit(WorkloadSubmission(
        name=name, context=ContextSpec(model=str(model)), batch_size=batch_size,
        output=str(tmp_path / "out" / f"{name}.jsonl"),
        rows=[RowIn(row_id=str(i), prompt=f"p{i}") for i in range(n)])).context_id


def cold(core: ServiceCore, chunks: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """A new worker and the context it is told to load."""
    wid = core.register(WorkerRegistration(host="h", pid=1, chunks=list(chunks))).worker_id
    return wid, assigned(core, wid)


def ready(core: ServiceCore, wid: str, ctx: str, seconds: float = 30.0) -> None:
    core.library_event(wid, LibraryEvent(context_id=ctx, state=ContextState.READY, seconds=seconds))


def assigned(core: ServiceCore, wid: str) -> str | None:
    """The context the service tells idle worker ``wid`` to load (None: none)."""
    spec = core.lease_batch(wid, LeaseRequest(max_batches=0)).assign_context
    return spec.context_id if spec else None


def run_batches(core: ServiceCore, wid: str, ctx: str, n: int, seconds: float) -> None:
    """Lease and finish ``n`` batches over ``seconds``."""
    resp = core.lease_batch(wid, LeaseRequest(context_id=ctx, context_state=ContextState.READY, max_batches=n))
    assert len(resp.batches) == n
    for b in resp.batches:
        clock_of(core).t += seconds / n
        core.report(wid, BatchReport(batch_id=b.batch_id, results=[
            RowResult(idx=r.idx, text="t", finish_reason="length") for r in b.rows]))


def switch(core: ServiceCore, wid: str, ctx: str) -> str | None:
    """What a worker done with ``ctx`` (nothing queued there, nothing in flight) is told to load."""
    resp = core.lease_batch(wid, LeaseRequest(context_id=ctx, context_state=ContextState.READY, max_batches=2))
    assert resp.batches == []
    return resp.assign_context.context_id if resp.assign_context else None


def test_two_cold_workers_take_one_context_each(core: ServiceCore, tmp_path: Path) -> None:
    a = submit(core, tmp_path, "a", 300)
    b = submit(core, tmp_path, "b", 100)
    assert cold(core)[1] == a  # the most work first
    assert cold(core)[1] == b  # then the context nobody runs, not a second copy of a
    _, third = cold(core)  # 30 batches of a for one loading worker: a newcomer helps there
    assert third == a


def test_no_switch_to_a_context_its_warm_worker_finishes_first(core: ServiceCore, tmp_path: Path) -> None:
    a = submit(core, tmp_path, "a", 100)
    b = submit(core, tmp_path, "b", 10)
    w1, got1 = cold(core)
    w2, got2 = cold(core)
    assert (got1, got2) == (a, b)
    clock_of(core).t += 30
    ready(core, w1, a)  # time to ready measured: 30 s
    ready(core, w2, b)
    run_batches(core, w1, a, 2, seconds=1.0)  # 20 rows/s
    run_batches(core, w2, b, 1, seconds=0.5)
    # w2 is done with b; a has 80 rows left at 20 rows/s: 4 s of work, a restart takes 30 s
    assert switch(core, w2, b) is None
    # a new worker is given it all the same: the demand model decided it was worth starting
    assert cold(core)[1] == a


def test_worker_switches_only_to_work_its_start_pays_for(core: ServiceCore, tmp_path: Path) -> None:
    a = submit(core, tmp_path, "a", 20)
    b = submit(core, tmp_path, "b", 20)
    w1, _ = cold(core)
    w2, _ = cold(core)
    clock_of(core).t += 30
    ready(core, w1, a)
    ready(core, w2, b)
    # w1 finishes a; b has a warm worker that finishes its 20 rows long before w1 could reload
    run_batches(core, w1, a, 2, seconds=1.0)
    assert switch(core, w1, a) is None
    c = submit(core, tmp_path, "c", 5000)
    assert switch(core, w1, a) == c  # nobody runs c: worth the switch


def test_worker_whose_disk_holds_a_model_loads_it(core: ServiceCore, tmp_path: Path) -> None:
    submit(core, tmp_path, "a", 300)
    b = submit(core, tmp_path, "b", 100)
    digest = core.contexts_with_work()[b][0].model_digest
    chunks = tuple(core.replicas.manifest(digest).chunk_lengths)
    assert cold(core, chunks)[1] == b


def work(warm: int, rows: int, rate: float | None, cached: bool = False, first: int = 1) -> ContextWork:
    return ContextWork(spec=ContextSpec(model=f"/m{first}", model_digest=str(first)), rows_left=rows,
                       queued_batches=max(1, rows // 10), first_batch=first, warm=warm, rate=rate, cached=cached)


def test_choice_follows_work_per_worker_and_start_cost() -> None:
    p = DemandPolicy()
    big, small = work(2, 10_000, 10.0, first=1), work(1, 6_000, 10.0, first=2)
    # per worker once joined: big 10000/10/3 = 333 s, small 6000/10/2 = 300 s
    assert choose_context([big, small], 60, 30, p) == big.spec
    # a start that takes longer than the warm workers need for the rest: none
    assert choose_context([work(1, 200, 10.0)], 60, 30, p) is None
    # the same work, cached on this worker: only the engine's load (5 s) to pay
    assert choose_context([work(1, 200, 10.0, cached=True)], 60, 5, p) is not None


def test_a_new_environment_is_a_new_context_run_only_by_workers_started_from_it(core: ServiceCore,
                                                                                tmp_path: Path) -> None:
    """With a packed worker environment, a context names its digest: a worker from another
    environment (a venv, or an older pack) is given none of its work; one started from it is."""
    before = submit(core, tmp_path, "a", 20)
    archive = tmp_path / "pcm-env.tar.gz"
    archive.write_bytes(b"a packed environment" * 1000)
    env = core.replicas.register_environment(archive)
    after = submit(core, tmp_path, "a", 20)  # the same model and engine, now in the packed environment
    assert after != before
    with core.store.read() as db:
        spec = ContextSpec.model_validate_json(
            db.execute("SELECT spec FROM contexts WHERE context_id=?", (after,)).fetchone()[0])
    assert spec.environment == env.digest
    venv_worker = core.register(WorkerRegistration(host="h", pid=1)).worker_id
    assert assigned(core, venv_worker) == before
    old_pack = core.register(WorkerRegistration(host="h", pid=2, environment="0" * 64)).worker_id
    assert assigned(core, old_pack) == before
    packed = core.register(WorkerRegistration(host="h", pid=3, environment=env.digest)).worker_id
    assert assigned(core, packed) in (before, after)
    # once the venv workload is done, the packed worker gets the new context and the others nothing
    with core.store.transaction() as db:
        db.execute("UPDATE batches SET state=? WHERE context_id=?", (BatchState.DONE.value, before))
    assert assigned(core, packed) == after
    assert assigned(core, venv_worker) is None
    assert assigned(core, old_pack) is None
