"""Plots of a run from the service's records (a ``RunHistory``): the pool by worker state,
context states, rows done, engine starts, weight bytes by source; and ``write_report``, the
PNGs with an index.html. `pcm report`, `pcm run` and the benchmarks draw with these."""
from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from pcm_service.protocol import LIVE_WORKER_STATES, ContextState, RunHistory, WorkerState

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MIB = 2**20
POOL_COLORS = {WorkerState.STARTING: "tab:gray", WorkerState.IDLE: "tab:orange", WorkerState.BUSY: "tab:green",
               WorkerState.DRAINING: "tab:purple"}
CONTEXT_COLORS = {ContextState.ABSENT: "lightgray", ContextState.FETCHING: "tab:blue",
                  ContextState.CACHED: "tab:cyan", ContextState.LOADING: "tab:orange",
                  ContextState.READY: "tab:green", ContextState.FAILED: "tab:red"}


def _minutes(h: RunHistory, t: float) -> float:
    return (t - h.start) / 60


Series = tuple[list[float], dict[Any, list[int]]]


def states_over_time(h: RunHistory, key: Callable[[Any], Any], keys: Iterable[Any]) -> Series:
    """(times in minutes, count per key at each time) of the live workers: a step function that
    changes at every recorded change of a worker."""
    now: dict[str, Any] = {}
    times, counts = [0.0], {k: [0] for k in keys}
    for c in h.workers:
        if c.state in LIVE_WORKER_STATES:
            now[c.worker_id] = key(c)
        else:
            now.pop(c.worker_id, None)
        n = Counter(now.values())
        times.append(max(0.0, _minutes(h, c.at)))
        for k, series in counts.items():
            series.append(n[k])
    times.append(_minutes(h, h.end))
    for series in counts.values():
        series.append(series[-1])
    return times, counts


def _stacked(ax: "Axes", times: list[float], counts: dict[Any, list[int]], colors: dict[Any, str]) -> None:
    base = [0] * len(times)
    for k, series in counts.items():
        top = [b + s for b, s in zip(base, series, strict=True)]
        if any(series):
            ax.fill_between(times, base, top, step="post", color=colors[k], label=k.value, linewidth=0)
        base = top
    ax.step(times, base, where="post", color="black", linewidth=0.8)
    ax.set_xlim(0, max(times[-1], 1e-3))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("minutes")


def draw_pool(ax: "Axes", h: RunHistory) -> None:
    """Workers by state over time: a glidein evicted is a drop of the top line."""
    times, counts = states_over_time(h, lambda c: c.state, POOL_COLORS)
    _stacked(ax, times, counts, POOL_COLORS)
    ax.set_ylabel("workers")
    ax.legend(loc="upper right", fontsize=8)


def draw_contexts(ax: "Axes", h: RunHistory) -> None:
    times, counts = states_over_time(h, lambda c: c.context_state, CONTEXT_COLORS)
    _stacked(ax, times, counts, CONTEXT_COLORS)
    ax.set_ylabel("workers by context state")
    ax.legend(loc="upper right", fontsize=8)


def draw_rows(ax: "Axes", h: RunHistory, color: Optional[str] = None) -> None:
    """Rows done over time, one line per workload (failed rows dashed)."""
    names = {w.workload_id: w.name for w in h.workloads}
    for wl_id in names:
        buckets = [r for r in h.rows if r.workload_id == wl_id]
        done = failed = 0
        t, d, f = [0.0], [0], [0]
        for r in buckets:  # flat across empty buckets, rising within each one
            t += [_minutes(h, r.at), _minutes(h, r.at + h.width)]
            d += [done, done + r.rows]
            f += [failed, failed + r.failed]
            done, failed = done + r.rows, failed + r.failed
        line = ax.plot(t, d, label=names[wl_id], color=color)[0]
        if failed:
            ax.plot(t, f, linestyle="--", color=line.get_color(), label=f"{names[wl_id]} failed")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("minutes")
    ax.set_ylabel("rows done")
    if len(names) > 1 or any(r.failed for r in h.rows):
        ax.legend(loc="lower right", fontsize=8)


def draw_engines(ax: "Axes", h: RunHistory) -> None:
    """Each engine start as a bar from its start to ready (green) or failure (red), per worker."""
    order: dict[str, int] = {}
    for e in h.engines:
        y = order.setdefault(e.worker_id, len(order))
        ax.barh(y, e.seconds / 60, left=_minutes(h, e.at - e.seconds), color="tab:green" if e.ok else "tab:red",
                height=0.6)
    ax.set_yticks(list(order.values()), list(order) if len(order) <= 30 else [""] * len(order), fontsize=7)
    ax.set_xlim(left=min([0.0, *(_minutes(h, e.at - e.seconds) for e in h.engines)]))
    ax.set_xlabel("minutes")
    ax.set_title(f"{sum(e.ok for e in h.engines)} engine starts, {sum(not e.ok for e in h.engines)} failed",
                 fontsize=9)


def draw_bytes(ax: "Axes", h: RunHistory) -> None:
    t, origin, peer = [0.0], [0.0], [0.0]
    for b in h.transfers:
        t += [_minutes(h, b.at), _minutes(h, b.at + h.width)]
        origin += [origin[-1], origin[-1] + b.origin_bytes / MIB]
        peer += [peer[-1], peer[-1] + b.peer_bytes / MIB]
    ax.plot(t, origin, label="from the origin")
    ax.plot(t, peer, label="from peers")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB of weights copied")
    ax.legend(loc="upper left", fontsize=8)


PLOTS: dict[str, tuple[str, Callable[["Axes", RunHistory], None]]] = {
    "pool.png": ("Workers by state", draw_pool),
    "rows.png": ("Rows done", draw_rows),
    "engines.png": ("Engine starts (start to ready)", draw_engines),
    "contexts.png": ("Contexts by state", draw_contexts),
    "bytes.png": ("Model weights copied, by source", draw_bytes),
}


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_report(h: RunHistory, out: Path) -> list[Path]:
    """The PNGs and an index.html with them and a summary table, in ``out``."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, draw) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 3.6))
        draw(ax, h)
        ax.set_title(title if not ax.get_title() else f"{title}: {ax.get_title()}")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    (out / "index.html").write_text(index_html(h), encoding="utf-8")
    (out / "history.json").write_text(h.model_dump_json(), encoding="utf-8")  # what was plotted
    return [out / "index.html", *written]


def index_html(h: RunHistory) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(w.workload_id)}</td><td>{e(w.name)}</td><td>{e(w.state.value)}</td><td>{w.rows_done}/"
        f"{w.rows_total}</td><td>{w.rows_failed}</td><td>{((w.finished_at or h.end) - w.created_at):.1f}</td>"
        f"<td>{w.rows_per_second:.1f}</td></tr>" for w in h.workloads)
    ready = [x.seconds for x in h.engines if x.ok]
    facts = {
        "span": f"{(h.end - h.start) / 60:.1f} min",
        "workers seen": str(len({c.worker_id for c in h.workers})),
        "engine starts": f"{len(ready)} ({sum(not x.ok for x in h.engines)} failed)",
        "mean time to ready": f"{sum(ready) / len(ready):.1f} s" if ready else "-",
        "weights from the origin": f"{sum(b.origin_bytes for b in h.transfers) / MIB:.1f} MiB",
        "weights from peers": f"{sum(b.peer_bytes for b in h.transfers) / MIB:.1f} MiB",
    }
    facts_html = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts.items())
    images = "".join(f'<h2>{e(title)}</h2><img src="{name}" alt="{e(title)}">' for name, (title, _) in PLOTS.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PCM run report</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5em}} td,th{{padding:.2em .7em;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>PCM run report{f": {e(h.workload_id)}" if h.workload_id else ""}</h1>
<table><tr><th>workload</th><th>name</th><th>state</th><th>rows</th><th>failed</th><th>makespan s</th>
<th>rows/s</th></tr>{rows}</table>
<h2>Summary</h2><table>{facts_html}</table>
{images}
</body></html>
"""
