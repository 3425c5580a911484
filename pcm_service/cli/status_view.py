"""Rich rendering of `pcm status --wide`. Every cell and line is a ``plain`` Text: what workers
sent (hosts, GPU names, TaskVine's view of them, glidein details) prints as it is, never as
Rich markup or terminal control sequences."""
from __future__ import annotations

import time

from rich.console import Group, RenderableType
from rich.table import Table

from pcm_service.cli.common import plain
from pcm_service.protocol import GlideinState, ServiceStatus, TaskVineStatus, WorkerStatus

MIB = 2**20


def context_cell(w: WorkerStatus) -> str:
    """"fetching 5/16 chunks (80/256 MiB) from 3 sources", or just the state."""
    f = w.fetch
    if f is None:
        return w.context_state.value
    return (f"{w.context_state.value} {f.chunks_held}/{f.chunks_total} chunks"
            f" ({f.bytes_held / MIB:.0f}/{f.bytes_total / MIB:.0f} MiB)"
            f" from {f.sources} source{'s' if f.sources != 1 else ''}")


def taskvine_table(tv: TaskVineStatus) -> Table:
    """The TaskVine manager's own view of its workers (`vine_status 127.0.0.1 PORT` shows it too)."""
    project = f", project {tv.project}" if tv.project else ""
    table = Table(title=plain(f"TaskVine manager on port {tv.port}{project}: {tv.workers_connected} workers,"
                        f" {tv.calls_running} calls running, {tv.calls_waiting} waiting"), title_justify="left")
    for col in ("worker", "glidein", "host", "address", "cores", "gpus", "memory MB", "libraries", "calls"):
        table.add_column(col)
    for w in tv.workers:
        table.add_row(*map(plain, (w.worker_id or "-", w.glidein_id or "-", w.host, w.addrport, w.cores, w.gpus,
                                   w.memory_mb, ",".join(w.libraries) or "-", w.calls_running)))
    return table


def render_status(st: ServiceStatus) -> Group:
    glideins = {g.glidein_id: g for g in st.glideins}
    workers = Table(title=f"Workers ({len(st.workers)})", title_justify="left")
    for col in ("worker", "glidein", "host", "gpu", "state", "context", "ctx state", "in flight",
                "rows", "starts", "idle s"):
        workers.add_column(col)
    for w in st.workers:
        g = glideins.get(w.glidein_id or "")
        gpus = w.gpus or (g.gpus if g else [])
        workers.add_row(*map(plain, (w.worker_id, w.glidein_id or "-", (g.host if g and g.host else w.host),
                                     ",".join(gpus) or "-", w.state.value, w.context_id or "-",
                                     context_cell(w), w.inflight_batches, w.rows_done,
                                     w.library_starts, f"{w.idle_seconds:.0f}")))
    parts: list[RenderableType] = [workers]
    if st.executor is not None and st.executor.taskvine is not None:
        parts.append(taskvine_table(st.executor.taskvine))
    if st.audits:  # spot-check audits: hosts whose batches others ran again
        au = Table(title=f"Audited hosts ({len(st.audits)})", title_justify="left")
        for col in ("host", "audited", "disagreements", "leases"):
            au.add_column(col)
        for h in st.audits:
            au.add_row(plain(h.host), str(h.audited), str(h.disagreements), "barred" if h.barred else "ok")
        parts.append(au)
    with_worker = {w.glidein_id for w in st.workers}
    orphans = [g for g in st.glideins if g.glidein_id not in with_worker and g.state != GlideinState.EXITED]
    if orphans:
        now = time.time()
        gl = Table(title=f"Glideins without a worker ({len(orphans)})", title_justify="left")
        for col in ("glidein", "state", "for", "host", "gpus", "detail"):
            gl.add_column(col)
        for g in orphans:
            gl.add_row(*map(plain, (g.glidein_id, g.state.value, f"{now - g.since:.0f}s" if g.since else "-",
                                    g.host or "-", ",".join(g.gpus) or "-", g.detail)))
        parts.append(gl)
    loads = Table(title=f"Workloads ({len(st.workloads)})", title_justify="left")
    for col in ("workload", "name", "state", "rows", "failed", "rows/s", "output"):
        loads.add_column(col)
    for wl in st.workloads:
        pct = 100.0 * wl.rows_done / wl.rows_total if wl.rows_total else 100.0
        loads.add_row(*map(plain, (wl.workload_id, wl.name, wl.state.value,
                                   f"{wl.rows_done}/{wl.rows_total} ({pct:.0f}%)", wl.rows_failed,
                                   f"{wl.rows_per_second:.1f}", wl.output)))
    d, t = st.demand, st.transfers
    if t.transfers:
        parts.append(plain(f"Weights served: origin {t.origin_bytes / MIB:.1f} MiB, peers {t.peer_bytes / MIB:.1f} MiB"
                     f" ({t.transfers} chunk transfers, {t.failures} failed, {t.active} in flight)"))
    parts += [loads, plain(f"Demand: {d.workers_wanted} workers — {d.reason}")]  # the reason ends with the limits
    return Group(*parts)
