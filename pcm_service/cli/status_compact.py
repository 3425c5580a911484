"""`pcm status` for an 80-column terminal, in the spirit of `condor_q`'s summary: one line per
workload, a few summary lines for the pool, then the workers with short ids and states (the
full view is `--wide`, the raw one `--json`). Every cell and line is a ``plain`` Text: what
workers sent prints as it is, never as Rich markup or terminal control sequences."""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any, Iterable, Mapping, Optional

from rich.console import Group, RenderableType
from rich.table import Table

from pcm_service.cli.common import plain
from pcm_service.protocol import (
    ContextState,
    Glidein,
    GlideinState,
    ServiceStatus,
    WorkerState,
    WorkerStatus,
    WorkloadState,
    WorkloadStatus,
)

RATE_WINDOW = 60.0  # seconds of samples behind a --watch rows/s
WORKER_STATE = {WorkerState.STARTING: "start", WorkerState.IDLE: "idle", WorkerState.BUSY: "busy",
                WorkerState.DRAINING: "drain", WorkerState.RETIRED: "gone", WorkerState.LOST: "lost"}
CONTEXT_STATE = {ContextState.ABSENT: "-", ContextState.FETCHING: "fetch", ContextState.CACHED: "cached",
                 ContextState.LOADING: "load", ContextState.READY: "ready", ContextState.FAILED: "FAILED"}
ENDED = {WorkloadState.COMPLETED: "done", WorkloadState.CANCELLED: "cancelled", WorkloadState.EXPIRED: "expired"}


class RecentRates:
    """Rows/s of each workload over the last minute, from the samples `--watch` has taken."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: dict[str, deque[tuple[float, int]]] = {}

    def add(self, st: ServiceStatus, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        for wl in st.workloads:
            q = self.samples.setdefault(wl.workload_id, deque())
            q.append((now, wl.rows_done))
            while len(q) > 2 and now - q[1][0] >= self.window:
                q.popleft()

    def rate(self, workload_id: str) -> Optional[float]:
        q = self.samples.get(workload_id)
        if not q or len(q) < 2 or q[-1][0] <= q[0][0]:
            return None
        return (q[-1][1] - q[0][1]) / (q[-1][0] - q[0][0])


def short(ident: Optional[str], keep: int = 6) -> str:
    """``wl-3f2a9c1b7e0d`` -> ``wl-3f2a9c``: the prefix and a few characters, like a short git hash."""
    if not ident:
        return "-"
    prefix, sep, rest = ident.partition("-")
    return f"{prefix}{sep}{rest[:keep]}" if sep else ident[:keep + 3]


def count(n: float) -> str:
    """1234 -> 1234, 12345 -> 12.3k, 1234567 -> 1.23M: fits a narrow column."""
    if n < 10_000:
        return f"{n:.0f}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1e6:.2f}M"


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s < 100 * 3600 else f"{s // 86400}d"


def eta(wl: WorkloadStatus, rate: Optional[float]) -> str:
    if wl.state in ENDED:
        return ENDED[wl.state]
    left = wl.rows_total - wl.rows_done
    if wl.state == WorkloadState.CANCELLING:
        return "cancel"
    if not rate or rate <= 0:
        return "-" if wl.rows_done else "queued"
    return duration(left / rate)


def _table(*columns: str) -> Table:
    t = Table(box=None, pad_edge=False, padding=(0, 1), show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, no_wrap=True, justify="right" if c in ("DONE", "TOTAL", "%", "FAIL", "ROWS/S", "ROWS",
                                                                  "STARTS", "ETA") else "left")
    return t


def workload_table(st: ServiceStatus, rates: Optional[RecentRates]) -> Table:
    t = _table("WORKLOAD", "NAME", "DONE", "TOTAL", "%", "FAIL", "ROWS/S", "ETA")
    for wl in st.workloads:
        rate = rates.rate(wl.workload_id) if rates is not None else wl.rows_per_second
        pct = 100 * wl.rows_done // wl.rows_total if wl.rows_total else 100
        t.add_row(*map(plain, (short(wl.workload_id), wl.name[:16], count(wl.rows_done), count(wl.rows_total),
                               f"{pct}%", count(wl.rows_failed), "-" if rate is None else f"{rate:.1f}",
                               eta(wl, rate))))
    return t


def _tally(labels: Mapping[Any, str], values: Iterable[Any]) -> str:
    n = Counter(values)
    return ", ".join(f"{n[k]} {v}" for k, v in labels.items() if n[k]) or "none"


def plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def pool_lines(st: ServiceStatus) -> list[str]:
    g = Counter(gl.state for gl in st.glideins)
    d = st.demand
    live = [w for w in st.workers if w.state not in (WorkerState.RETIRED, WorkerState.LOST)]
    lines = [
        f"Glideins: {g[GlideinState.IDLE]} idle, {g[GlideinState.RUNNING]} running, {g[GlideinState.HELD]} held",
        f"Workers:  {len(live)} ({_tally({s: s.value for s in WorkerState}, [w.state for w in st.workers])})",
        f"Contexts: {_tally({s: s.value for s in ContextState}, [w.context_state for w in live])}",
        f"Demand:   {plural(d.workers_wanted, 'worker')} (min {d.limits.min_workers}, max {d.limits.max_workers}),"
        f" {count(d.rows_left)} rows left",
    ]
    ex = st.executor
    if ex is not None:
        lines.append(f"Executor: {ex.kind.value}, {ex.workers_connected} of {plural(ex.workers_known, 'worker')}"
                     f" connected, {ex.workers_busy} busy, {ex.batches_in_flight} batches in flight")
    t = st.transfers
    if t.transfers:
        mib = 2**20
        lines.append(f"Weights:  {t.origin_bytes / mib:.0f} MiB from the origin, {t.peer_bytes / mib:.0f} MiB"
                     f" from peers, {t.active} in flight")
    return lines


def context_cell(w: WorkerStatus) -> str:
    if w.fetch is not None and w.fetch.chunks_total:
        return f"fetch {100 * w.fetch.chunks_held // w.fetch.chunks_total}%"
    return CONTEXT_STATE[w.context_state]


def worker_table(st: ServiceStatus) -> Table:
    t = _table("WORKER", "GLIDEIN", "HOST", "STATE", "CONTEXT", "CTX", "ROWS", "STARTS")
    hosts = {g.glidein_id: g.host for g in st.glideins if g.host}
    for w in st.workers:
        host = (hosts.get(w.glidein_id or "") or w.host).split(".")[0][:12]
        t.add_row(*map(plain, (short(w.worker_id), (w.glidein_id or "-")[:12], host, WORKER_STATE[w.state],
                               short(w.context_id, 4), context_cell(w), count(w.rows_done), w.library_starts)))
    return t


def render_compact(st: ServiceStatus, rates: Optional[RecentRates] = None) -> Group:
    """``rates``: rows/s over the last minute (``--watch``); else each workload's average."""
    parts: list[RenderableType] = [workload_table(st, rates), "", *map(plain, pool_lines(st))]
    with_worker = {w.glidein_id for w in st.workers}
    waiting = [g for g in st.glideins if g.glidein_id not in with_worker and g.state != GlideinState.EXITED]
    envs = {b.glidein_id: b.progress for b in st.bootstrapping if b.glidein_id}
    if st.bootstrapping:
        held = sum(b.progress.bytes_held for b in st.bootstrapping)
        total = sum(b.progress.bytes_total for b in st.bootstrapping)
        parts.append(plain(f"Environment: {plural(len(st.bootstrapping), 'glidein')} fetching,"
                           f" {held / 2**20:.0f}/{total / 2**20:.0f} MiB"))
    if waiting:
        now = time.time()

        def env(g: Glidein) -> str:
            p = envs.get(g.glidein_id)
            return f" env {100 * p.chunks_held // p.chunks_total}%" if p is not None and p.chunks_total else ""

        shown = ", ".join(f"{g.glidein_id} {g.state.value}" + (f" {duration(now - g.since)}" if g.since else "")
                          + env(g) for g in waiting[:3])
        more = f" (+{len(waiting) - 3})" if len(waiting) > 3 else ""
        parts.append(plain(f"No worker yet: {shown}{more}"))
    parts += ["", worker_table(st) if st.workers else "No workers."]
    return Group(*parts)
