"""The worker's lease ledger, without an engine: a batch stays held (in heartbeats) from its
lease until its last report is delivered, through every step in between."""
from __future__ import annotations

import threading

from pcm_service.protocol import BatchLease, RowResult, RowTask, SamplingSettings
from worker_image.ledger import LeaseLedger


def lease(batch_id: int, rows: int) -> BatchLease:
    return BatchLease(batch_id=batch_id, workload_id="wl", context_id="ctx", sampling=SamplingSettings(),
                      rows=[RowTask(idx=i, row_id=str(i), prompt="p") for i in range(rows)])


def done(*idx: int) -> list[RowResult]:
    return [RowResult(idx=i, text="t") for i in idx]


def test_a_batch_is_held_from_lease_to_its_last_delivered_report() -> None:
    ledger = LeaseLedger()
    ledger.leased([lease(1, 2), lease(2, 1)], lease_seq=3)
    assert ledger.holding().batches == [1, 2] and ledger.holding().lease_seq == 3
    ledger.finished(1, done(0))  # one of two rows
    ledger.finished(2, done(0))  # its only row: out of flight, its report not delivered yet
    h = ledger.holding()
    assert (h.inflight_batches, h.batches) == (1, [1, 2])
    ledger.delivered(2)
    assert ledger.holding().batches == [1]
    rep = ledger.finished(1, done(1))
    assert rep.batch_id == 1 and [r.idx for r in rep.results] == [1] and not ledger.busy
    assert ledger.holding().batches == [1]  # two reports of batch 1 queued
    ledger.delivered(1, reports=2)
    assert ledger.holding().batches == [] and ledger.holding().lease_seq == 3


def test_released_rows_are_reported_returned_or_crashed_and_stay_held_until_delivered() -> None:
    ledger = LeaseLedger()
    ledger.leased([lease(1, 3), lease(2, 2)], lease_seq=1)
    ledger.finished(2, done(0, 1))
    reports = ledger.release()
    assert [(r.batch_id, r.returned, r.crashed) for r in reports] == [(1, [0, 1, 2], [])]
    assert not ledger.busy and ledger.holding().batches == [1, 2]
    ledger.leased([lease(3, 2)], lease_seq=2)
    ledger.finished(3, done(1))
    assert [(r.batch_id, r.crashed) for r in ledger.release(crashed=True)] == [(3, [0])]
    ledger.registered()  # a new worker id starts its lease numbers again
    assert ledger.holding().lease_seq == 0


def test_a_heartbeat_never_sees_a_finishing_batch_in_neither_place() -> None:
    """The finishing thread and the heartbeat thread race; every snapshot taken before the
    report is delivered must hold the batch (checked over many rounds, no sleeps)."""
    ledger = LeaseLedger()
    missing = []
    for batch_id in range(300):
        ledger.leased([lease(batch_id, 1)], lease_seq=batch_id + 1)
        finished = threading.Event()

        def finish(b: int = batch_id, finished: threading.Event = finished) -> None:
            ledger.finished(b, done(0))
            finished.set()

        t = threading.Thread(target=finish)
        t.start()
        while not finished.is_set():
            if batch_id not in ledger.holding().batches:
                missing.append(batch_id)
        t.join()
        assert batch_id in ledger.holding().batches  # finished, not delivered
        ledger.delivered(batch_id)
    assert missing == []


def test_batches_wanted_keeps_two_in_flight_then_fills_to_the_target_rows() -> None:
    ledger = LeaseLedger()
    assert ledger.batches_wanted(target_rows=64, max_batches=16) == 2
    ledger.leased([lease(1, 10), lease(2, 10)], lease_seq=1)
    assert ledger.batches_wanted(target_rows=64, max_batches=16) == 5  # (64 - 20) / 10 rows per batch
    assert ledger.batches_wanted(target_rows=64, max_batches=3) == 1
    assert ledger.batches_wanted(target_rows=20, max_batches=16) == 0
