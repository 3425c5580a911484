"""`pcm run`: a workload on this machine, with an embedded service, factory and workers."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import typer

from pcm_service.cli.common import (
    EvictCountOpt,
    EvictEveryOpt,
    EvictSignalOpt,
    console,
    eviction_settings,
    fail,
    load_workload_file,
    progress_bar,
    report_done,
)
from pcm_service.core.config import RUN_IDLE_TIMEOUT


def run(workload: Path = typer.Argument(..., help="Workload YAML file"),
        workers: int = typer.Option(1, min=1, help="Most local workers to start"),
        state_dir: Optional[Path] = typer.Option(None, help="Service state and logs (default: a temp dir)"),
        idle_timeout: float = typer.Option(RUN_IDLE_TIMEOUT, help="Seconds an idle worker waits before retiring"),
        evict_every: Optional[float] = EvictEveryOpt,
        evict_signal: str = EvictSignalOpt,
        evict_count: Optional[int] = EvictCountOpt,
        seed: Optional[int] = typer.Option(None, help="Eviction drill: random seed")) -> None:
    """Run a workload on this machine: embedded service, local factory, local workers."""
    from pcm_service.cli.embedded import run_workload
    from pcm_service.core import ServiceConfig

    sub = load_workload_file(workload)
    eviction = eviction_settings(evict_every, evict_signal, evict_count, seed)
    sdir = state_dir or Path(tempfile.mkdtemp(prefix="pcm-run-"))
    console.print(f"running {sub.name}: {len(sub.rows)} rows, batch size {sub.batch_size},"
                  f" up to {workers} worker(s); state and logs in {sdir}", highlight=False)
    with progress_bar() as bar:
        task = bar.add_task(sub.name, total=len(sub.rows), rate=0.0)
        try:
            res = run_workload(sub, sdir, workers=workers, config=ServiceConfig(idle_timeout=idle_timeout),
                               eviction=eviction,
                               on_progress=lambda st: bar.update(task, completed=st.rows_done,
                                                                 rate=st.rows_per_second))
        except KeyboardInterrupt:
            fail(f"interrupted; state and logs kept in {sdir}", code=130)
    console.print(f"makespan {res.makespan:.1f}s; engine starts per worker: "
                  f"{json.dumps(res.library_starts)}", highlight=False)
    report_done(res.status)
