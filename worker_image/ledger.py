"""The batches a worker holds, and the newest lease response it has taken in.

A batch is held while it is in flight (rows not finished) or while a report of it is
queued but not yet delivered. Heartbeats send what is held with ``lease_seq`` and the
service requeues any batch it leased in a response the worker has seen but no longer
holds, so a batch must never be in neither: it leaves "in flight" and enters "undelivered"
in one critical section (the race fixed in commit 5fd8e54).
"""
from __future__ import annotations

import math
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from pcm_service.protocol import BatchLease, BatchReport, RowResult


@dataclass(frozen=True)
class Holding:
    """What a heartbeat reports, all from one moment."""

    inflight_batches: int
    batches: list[int]  # in flight or with an undelivered report, sorted
    lease_seq: int


class LeaseLedger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[int, set[int]] = {}  # batch_id → row idx not finished yet
        self._undelivered: Counter[int] = Counter()  # batch_id → reports queued, not delivered
        self._lease_seq = 0

    def registered(self) -> None:
        """A new worker id: its lease responses are numbered from 1 again."""
        with self._lock:
            self._lease_seq = 0

    def leased(self, batches: list[BatchLease], lease_seq: int) -> None:
        with self._lock:
            for lease in batches:
                self._inflight[lease.batch_id] = {r.idx for r in lease.rows}
            self._lease_seq = max(self._lease_seq, lease_seq)

    def finished(self, batch_id: int, rows: list[RowResult]) -> BatchReport:
        """Rows the engine finished; the report to queue (counted undelivered from now on)."""
        with self._lock:
            left = self._inflight.get(batch_id, set())
            left.difference_update(r.idx for r in rows)
            if not left:
                self._inflight.pop(batch_id, None)
            self._undelivered[batch_id] += 1
        return BatchReport(batch_id=batch_id, results=rows)

    def release(self, crashed: bool = False) -> list[BatchReport]:
        """Every unfinished row, handed back (or, after a library crash, reported as crashed)."""
        with self._lock:
            held, self._inflight = self._inflight, {}
            reports = [BatchReport(batch_id=b, crashed=sorted(idx)) if crashed
                       else BatchReport(batch_id=b, returned=sorted(idx)) for b, idx in held.items() if idx]
            for rep in reports:
                self._undelivered[rep.batch_id] += 1
        return reports

    def delivered(self, batch_id: int, reports: int = 1) -> None:
        """``reports`` queued reports of the batch were sent (or given up on)."""
        with self._lock:
            self._undelivered[batch_id] -= reports
            if self._undelivered[batch_id] <= 0:
                del self._undelivered[batch_id]

    def holding(self) -> Holding:
        with self._lock:
            held = set(self._inflight) | {b for b, n in self._undelivered.items() if n > 0}
            return Holding(len(self._inflight), sorted(held), self._lease_seq)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._inflight)

    def batches_wanted(self, target_rows: int, max_batches: int) -> int:
        """More batches to lease: at least two in flight, then up to ``target_rows`` rows."""
        with self._lock:
            batches = len(self._inflight)
            rows = sum(len(v) for v in self._inflight.values())
        if batches < 2:
            return 2 - batches
        if rows >= target_rows or batches >= max_batches:
            return 0
        per_batch = max(1, rows // batches)
        return min(max_batches - batches, math.ceil((target_rows - rows) / per_batch))


class ReportQueue:
    """Reports on their way to the service: taken out all at once and merged per batch, so one
    engine step costs one request however many batches it finished. ``None`` is the last."""

    def __init__(self) -> None:
        self._q: "queue.Queue[Optional[BatchReport]]" = queue.Queue()

    def put(self, rep: Optional[BatchReport]) -> None:
        self._q.put(rep)

    def take(self) -> tuple[list[BatchReport], Counter[int], bool]:
        """Blocks for the next report: every one queued, merged; how many each batch had; the last?"""
        items = [self._q.get()]
        while True:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                break
        merged: dict[int, BatchReport] = {}
        queued: Counter[int] = Counter()
        for rep in items:
            if rep is None:
                continue
            queued[rep.batch_id] += 1
            m = merged.setdefault(rep.batch_id, BatchReport(batch_id=rep.batch_id))
            m.results.extend(rep.results)
            m.returned.extend(rep.returned)
            m.crashed.extend(rep.crashed)
        return list(merged.values()), queued, None in items
