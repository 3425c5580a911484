"""A run over time from the service's records (worker state changes, engine starts, row
finish times, chunk transfers): what `pcm report` plots. Counts are bucketed in SQL, so a
million-row workload is a few hundred numbers."""
from __future__ import annotations

from typing import Optional

from pcm_service.core.base import CoreBase
from pcm_service.core.errors import UnknownWorkload
from pcm_service.core.views import workload_status
from pcm_service.protocol import (
    ORIGIN,
    BytesMoved,
    ContextState,
    EngineStart,
    RowsDone,
    RowState,
    RunHistory,
    WorkerChange,
)

BUCKETS = 200  # rows-done and bytes buckets over the run


class HistoryOps(CoreBase):
    def history(self, workload_id: Optional[str] = None, buckets: int = BUCKETS) -> RunHistory:
        """The whole service's run, or the span of one workload (the pool is shared, so its
        workers and transfers are the pool's during that span)."""
        now = self.clock()
        where, args = ("WHERE workload_id=?", (workload_id,)) if workload_id else ("", ())
        with self.store.read() as db:
            wls = db.execute(f"SELECT * FROM workloads {where} ORDER BY created_at", args).fetchall()
            if workload_id and not wls:
                raise UnknownWorkload(workload_id)
            first, last = db.execute("SELECT MIN(at), MAX(at) FROM worker_history").fetchone()
            pool = [] if workload_id or first is None else [(first, last)]  # the whole service: its pool too
            start = min([w["created_at"] for w in wls] + [f for f, _ in pool], default=now)
            end = max([w["finished_at"] or now for w in wls] + [la for _, la in pool] + [start], default=now)
            width = max((end - start) / buckets, 1e-3)
            workers = [WorkerChange(worker_id=r["worker_id"], at=r["at"], state=r["state"],
                                    context_state=r["context_state"])
                       for r in db.execute("SELECT * FROM worker_history WHERE at<=? ORDER BY at, rowid", (end,))]
            engines = [EngineStart(worker_id=r["worker_id"], context_id=r["context_id"], at=r["at"],
                                   seconds=r["seconds"], ok=r["state"] == ContextState.READY.value)
                       for r in db.execute("SELECT * FROM library_events WHERE state IN (?,?) AND at BETWEEN ? AND ?"
                                           " ORDER BY at", (ContextState.READY.value, ContextState.FAILED.value,
                                                            start, end))]
            rows = [RowsDone(workload_id=r[0], at=start + r[1] * width, rows=r[2], failed=r[3]) for r in db.execute(
                f"SELECT workload_id, CAST((finished_at - ?) / ? AS INTEGER) AS b, COUNT(*), SUM(error IS NOT NULL)"
                f" FROM rows WHERE state=? AND finished_at IS NOT NULL"
                f"{' AND workload_id=?' if workload_id else ''} GROUP BY workload_id, b ORDER BY b",
                (start, width, RowState.DONE.value, *args))]
            moved = [BytesMoved(at=start + r[0] * width, origin_bytes=r[1], peer_bytes=r[2]) for r in db.execute(
                "SELECT CAST((at - ?) / ? AS INTEGER) AS b, SUM(CASE WHEN source=? THEN bytes ELSE 0 END),"
                " SUM(CASE WHEN source=? THEN 0 ELSE bytes END) FROM transfers WHERE ok=1 AND at BETWEEN ? AND ?"
                " GROUP BY b ORDER BY b", (start, width, ORIGIN, ORIGIN, start, end))]
        return RunHistory(start=start, end=end, width=width, workloads=[workload_status(w, now) for w in wls],
                          workers=workers, engines=engines, rows=rows, transfers=moved, workload_id=workload_id)
