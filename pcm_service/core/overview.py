"""What the service reports of itself: how the pool and its workloads stand now (`pcm status`),
and a run over time from its records (worker state changes, engine starts, row finish times,
chunk transfers): what `pcm report` plots. Counts are bucketed in SQL, so a million-row
workload is a few hundred numbers."""
from __future__ import annotations

from typing import Callable, Optional

from pcm_service.core.audit import host_audits
from pcm_service.core.errors import UnknownWorkload
from pcm_service.core.factories import FactoryRegistry
from pcm_service.core.views import worker_status, workload_status
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    ORIGIN,
    BytesMoved,
    ContextState,
    Demand,
    EngineStart,
    RowsDone,
    RowState,
    RunHistory,
    ServiceStatus,
    WorkerChange,
)
from pcm_service.store import MANAGER_KIND, RUNS_ROWS, Store, in_list
from pcm_service.weights.replicas import ReplicaMap

BUCKETS = 200  # rows-done and bytes buckets over the run


class Overview:
    """Reads only. ``library_starts`` (the workers' part) and ``demand`` (the pool's) are the
    two numbers of other parts a status shows."""

    def __init__(self, store: Store, clock: Callable[[], float], replicas: ReplicaMap, factories: FactoryRegistry,
                 library_starts: Callable[[], dict[str, int]], demand: Callable[[], Demand]) -> None:
        self.store, self.clock, self.replicas, self.factories = store, clock, replicas, factories
        self.library_starts, self.demand = library_starts, demand

    def status(self, include_gone: bool = False) -> ServiceStatus:
        """Workers (live ones, or all with ``include_gone``), workloads, demand, glideins, transfers, audits."""
        now = self.clock()
        starts = self.library_starts()
        live, states = in_list(LIVE_WORKER_STATES)
        where, params = (f"WHERE {RUNS_ROWS}", [MANAGER_KIND]) if include_gone else (
            f"WHERE {RUNS_ROWS} AND state IN {live}", [MANAGER_KIND, *states])
        with self.store.read() as db:
            workers = db.execute(f"SELECT * FROM workers {where} ORDER BY registered_at", params).fetchall()
            workloads = db.execute("SELECT * FROM workloads ORDER BY created_at").fetchall()
            audits = host_audits(db)
        fetching = ContextState.FETCHING.value
        return ServiceStatus(
            workers=[worker_status(w, starts.get(w["worker_id"], 0), now,
                                   self.replicas.progress(w["worker_id"])
                                   if w["context_state"] == fetching else None) for w in workers],
            workloads=[workload_status(r, now) for r in workloads],
            demand=self.demand(), glideins=self.factories.glideins(now),
            transfers=self.replicas.stats(), bootstrapping=self.replicas.bootstrap_progress(), audits=audits)

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
