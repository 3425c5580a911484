"""Rich rendering of `pcm status`."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table

from pcm_service.protocol import ServiceStatus


def render_status(st: ServiceStatus) -> Group:
    workers = Table(title=f"Workers ({len(st.workers)})", title_justify="left")
    for col in ("worker", "glidein", "host", "state", "context", "context state", "in flight",
                "rows done", "engine starts", "idle s"):
        workers.add_column(col)
    for w in st.workers:
        workers.add_row(w.worker_id, w.glidein_id or "-", w.host, w.state.value, w.context_id or "-",
                        w.context_state.value, str(w.inflight_batches), str(w.rows_done),
                        str(w.library_starts), f"{w.idle_seconds:.0f}")
    loads = Table(title=f"Workloads ({len(st.workloads)})", title_justify="left")
    for col in ("workload", "name", "state", "rows", "failed", "rows/s", "output"):
        loads.add_column(col)
    for wl in st.workloads:
        pct = 100.0 * wl.rows_done / wl.rows_total if wl.rows_total else 100.0
        loads.add_row(wl.workload_id, wl.name, wl.state.value,
                      f"{wl.rows_done}/{wl.rows_total} ({pct:.0f}%)", str(wl.rows_failed),
                      f"{wl.rows_per_second:.1f}", wl.output)
    d = st.demand
    return Group(workers, loads,
                 f"Demand: {d.workers_wanted} workers — {d.reason}; "
                 f"factory limits min {d.limits.min_workers} max {d.limits.max_workers}")
