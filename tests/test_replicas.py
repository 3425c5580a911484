"""The replica map's transfer plans, driven through ServiceCore (real SQLite, no HTTP)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

import pytest

from pcm_service.core import ServiceConfig, ServiceCore
from pcm_service.protocol import ORIGIN, FetchPlan, FetchRequest, ModelManifest, TransferResult, WorkerRegistration
from pcm_service.weights.modelpaths import ModelUnavailable
from pcm_service.weights.replicas import TransferPolicy
from tests.support.clock import FakeClock

CHUNK = 1024

Setup = tuple[ServiceCore, ModelManifest, FakeClock]  # the core, a registered model, the core's clock


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(bytes([9]) * CHUNK)
    for i in range(3):
        (model / f"w{i}.bin").write_bytes(bytes([i]) * CHUNK)  # four distinct one-chunk files
    clock = FakeClock()
    core = ServiceCore(tmp_path / "state", ServiceConfig(transfers=TransferPolicy(
        chunk_size=CHUNK, origin_slots=2, avoid_seconds=30), model_roots=(tmp_path,)), clock=clock)
    m = core.replicas.register_model(model)
    yield core, m, clock
    core.close()


def worker(core: ServiceCore, m: ModelManifest, holds: bool, slots: int = 2, host: Optional[str] = None) -> str:
    """A worker with a blob server; ``holds``: it fetched every chunk (a source for others only
    once the service saw it fetch them)."""
    wid = core.register(WorkerRegistration(
        host="h", pid=1, blob_url=f"http://{host or '127.0.0.1'}:1", upload_slots=slots), host).worker_id
    results: list[TransferResult] = []
    while holds:
        p = plan(core, wid, m, want=len(m.chunk_lengths), results=results)
        if p.progress.chunks_held == p.progress.chunks_total:
            break
        results = [TransferResult(chunk=a.chunk, source=a.source, ok=True, bytes=a.length) for a in p.assignments]
    return wid


def plan(core: ServiceCore, wid: str, m: ModelManifest, want: int = 4,
         results: Iterable[TransferResult] = ()) -> FetchPlan:
    return core.fetch_plan(wid, FetchRequest(manifest_digest=m.digest, want=want, results=list(results)))


def test_peers_first_origin_bounded_then_wait(setup: Setup) -> None:
    core, m, _ = setup
    a = worker(core, m, holds=True, slots=2)
    n = worker(core, m, holds=False)
    got = plan(core, n, m).assignments
    assert len({x.chunk for x in got}) == 4
    assert sorted(x.source for x in got) == sorted([a, a, ORIGIN, ORIGIN])
    # the peer's two slots and the origin's two are taken: a second newcomer waits
    other = worker(core, m, holds=False)
    assert plan(core, other, m).assignments == []
    assert core.status().transfers.active == 4


def test_rarest_chunks_go_to_different_newcomers_from_the_origin(setup: Setup) -> None:
    core, m, _ = setup
    n1, n2 = worker(core, m, holds=False), worker(core, m, holds=False)
    first = plan(core, n1, m, want=1).assignments
    second = plan(core, n2, m, want=1).assignments
    assert [x.source for x in first + second] == [ORIGIN, ORIGIN]
    assert first[0].chunk != second[0].chunk  # nobody holds either: one copy each, not two


def test_a_finished_chunk_makes_its_receiver_a_source_at_once(setup: Setup) -> None:
    core, m, _ = setup
    n1, n2 = worker(core, m, holds=False), worker(core, m, holds=False)
    c = plan(core, n1, m, want=1).assignments[0].chunk
    p = plan(core, n1, m, want=0, results=[TransferResult(chunk=c, source=ORIGIN, ok=True, bytes=CHUNK)])
    assert p.progress.chunks_held == 1 and p.progress.chunks_total == 4
    got = plan(core, n2, m, want=4).assignments
    assert [x.source for x in got if x.chunk == c] == [n1]
    assert core.status().transfers.origin_bytes == CHUNK


def holders(core: ServiceCore, chunk: str) -> set[str]:
    with core.store.read() as db:
        return {r[0] for r in db.execute("SELECT worker_id FROM replicas WHERE chunk=?", (chunk,))}


def test_corrupt_source_is_avoided_and_loses_its_replica_on_a_second_word(setup: Setup) -> None:
    """One worker saying a peer's copy is corrupt makes it avoid that peer; the replica goes
    only when a second worker, also sent there, says so too (one may lie about the source)."""
    core, m, clock = setup
    a = worker(core, m, holds=True, slots=4)
    n = worker(core, m, holds=False)
    got = plan(core, n, m, want=1).assignments
    assert got[0].source == a
    bad = TransferResult(chunk=got[0].chunk, source=a, ok=False, bytes=CHUNK, corrupt=True,
                         error="sha256 mismatch")
    again = plan(core, n, m, want=4, results=[bad]).assignments
    assert again and all(x.source == ORIGIN for x in again)  # avoided while it is bad
    assert a in holders(core, bad.chunk)
    assert core.status().transfers.failures == 1
    plan(core, n, m, want=0, results=[bad])  # the same worker again: not planned, not believed
    assert a in holders(core, bad.chunk) and core.status().transfers.failures == 1
    clock.t += 31  # no longer avoided
    n2 = worker(core, m, holds=False)
    got2 = [x for x in plan(core, n2, m, want=4).assignments if x.chunk == bad.chunk]
    assert got2 and got2[0].source == a
    plan(core, n2, m, want=0, results=[bad])
    assert a not in holders(core, bad.chunk)


def test_a_result_for_a_transfer_never_planned_changes_nothing(setup: Setup) -> None:
    """Found 4: a forged result naming another peer as corrupt, a claim to have fetched a chunk
    it was never sent, and a huge byte count: none is believed or counted."""
    core, m, _ = setup
    a = worker(core, m, holds=True, slots=4)
    liar = worker(core, m, holds=False)
    chunk = next(iter(m.chunk_lengths))
    forged = [TransferResult(chunk=chunk, source=a, ok=False, corrupt=True, error="x\nFAKE LOG LINE"),
              TransferResult(chunk=chunk, source=ORIGIN, ok=True, bytes=2**53 - 1)]
    plan(core, liar, m, want=0, results=forged)
    plan(core, liar, m, want=0, results=forged[:1])
    assert holders(core, chunk) == {a}
    st = core.status().transfers
    assert (st.transfers, st.origin_bytes) == (len(m.chunk_lengths), len(m.chunk_lengths) * CHUNK)


def test_busy_source_is_not_avoided_and_departed_workers_are_not_sources(setup: Setup) -> None:
    core, m, _ = setup
    a = worker(core, m, holds=True, slots=1)
    n = worker(core, m, holds=False)
    x = plan(core, n, m, want=1).assignments[0]
    assert x.source == a
    busy = TransferResult(chunk=x.chunk, source=a, ok=False, busy=True, error="HTTP 503")
    assert plan(core, n, m, want=1, results=[busy]).assignments[0].source == a
    core.retire(a)
    n2 = worker(core, m, holds=False)
    assert {y.source for y in plan(core, n2, m, want=4).assignments} == {ORIGIN}


def test_unreadable_model_is_refused_with_its_path(tmp_path: Path) -> None:
    core = ServiceCore(tmp_path / "state", ServiceConfig(model_roots=(tmp_path,)))
    with pytest.raises(ModelUnavailable, match="does not exist or the service cannot read it"):
        core.replicas.register_model(tmp_path / "nope")
    core.close()


def test_chunks_claimed_at_registration_are_never_a_source_for_others(setup: Setup) -> None:
    """Found 4: a worker that says it holds every chunk without having fetched any is never in
    another worker's plan (it still counts them for itself: its own cache, its own business)."""
    core, m, _ = setup
    liar = core.register(WorkerRegistration(host="h", pid=1, blob_url="http://127.0.0.1:1", upload_slots=64,
                                            chunks=list(m.chunk_lengths))).worker_id
    assert plan(core, liar, m, want=4).progress.chunks_held == len(m.chunk_lengths)
    n = worker(core, m, holds=False)
    sources = set()
    for _ in range(4):
        p = plan(core, n, m, want=4)
        sources |= {x.source for x in p.assignments}
        plan(core, n, m, want=0, results=[TransferResult(chunk=x.chunk, source=x.source, ok=True)
                                          for x in p.assignments])
    assert sources == {ORIGIN}


def test_workers_on_one_host_are_one_word_against_a_replica(setup: Setup) -> None:
    """Two workers calling from one address (a glidein's bootstrap and its worker, or sybils on
    one host) saying a peer's copy is corrupt count once; a worker on another host is the second."""
    core, m, clock = setup
    a = worker(core, m, holds=True, slots=4, host="127.0.0.5")
    chunk = None
    for host in ("127.0.0.6", "127.0.0.6", "127.0.0.7"):
        assert chunk is None or a in holders(core, chunk)
        clock.t += 31  # the source is no longer avoided after the previous word
        n = worker(core, m, holds=False, host=host)
        got = [x for x in plan(core, n, m, want=4).assignments if chunk in (None, x.chunk)]
        assert got and got[0].source == a
        chunk = got[0].chunk
        plan(core, n, m, want=0, results=[TransferResult(chunk=chunk, source=a, ok=False, bytes=CHUNK,
                                                           corrupt=True, error="sha256 mismatch")])
    assert chunk is not None and a not in holders(core, chunk)
