"""`pcm run`: a workload on this machine, with an embedded service, factory and workers."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import typer

from pcm_service.cli.common import (
    BatchSizeOpt,
    EngineArgOpt,
    EvictCountOpt,
    EvictEveryOpt,
    EvictSignalOpt,
    OutputOpt,
    console,
    eviction_settings,
    fail,
    load_workload_file,
    progress_bar,
    report_done,
)
from pcm_service.cli.executors import ExecutorOpt
from pcm_service.core.config import RUN_IDLE_TIMEOUT
from pcm_service.protocol import ExecutorKind


def run(workload: Path = typer.Argument(..., help="Workload YAML file, or an OpenAI Batch input file (.jsonl)"),
        model: Optional[str] = typer.Option(None, "--model", help="For an OpenAI batch file (.jsonl): the"
                                            " model directory to run it on"),
        engine_arg: list[str] = EngineArgOpt, batch_size: int = BatchSizeOpt,
        output: Optional[Path] = OutputOpt,
        workers: int = typer.Option(1, min=1, help="Most local workers to start"),
        state_dir: Optional[Path] = typer.Option(None, help="Service state and logs (default: a temp dir)"),
        idle_timeout: float = typer.Option(RUN_IDLE_TIMEOUT, help="Seconds an idle worker waits before retiring"),
        evict_every: Optional[float] = EvictEveryOpt,
        evict_signal: str = EvictSignalOpt,
        evict_count: Optional[int] = EvictCountOpt,
        seed: Optional[int] = typer.Option(None, help="Eviction drill: random seed"),
        executor: ExecutorKind = ExecutorOpt) -> None:
    """Run a workload on this machine: embedded service, local factory, local workers."""
    from pcm_service.cli.embedded import run_workload
    from pcm_service.core import ServiceConfig
    from pcm_service.core.workloads import OutputRefused

    if workload.suffix == ".jsonl" and (model is None or not Path(model).is_dir()):
        fail(f"{workload}: pcm run needs --model DIR, the model directory to run an OpenAI batch file on"
             " (pcm run starts its own service; it has no registered models)", code=2)
    sub = load_workload_file(workload, model, engine_arg, batch_size, output)
    eviction = eviction_settings(evict_every, evict_signal, evict_count, seed)
    sdir = state_dir or Path(tempfile.mkdtemp(prefix="pcm-run-"))
    console.print(f"running {sub.name}: {len(sub.rows)} rows, batch size {sub.batch_size},"
                  f" up to {workers} worker(s); state and logs in {sdir}", highlight=False)
    with progress_bar() as bar:
        task = bar.add_task(sub.name, total=len(sub.rows), rate=0.0)
        try:
            res = run_workload(sub, sdir, workers=workers, config=ServiceConfig(idle_timeout=idle_timeout),
                               eviction=eviction, executor=executor,
                               on_progress=lambda st: bar.update(task, completed=st.rows_done,
                                                                 rate=st.rows_per_second))
        except ImportError as e:
            fail(f"--executor {executor.value}: {e}", code=2)
        except OutputRefused as e:
            fail(f"{workload}: {e}", code=2)
        except KeyboardInterrupt:
            fail(f"interrupted; state and logs kept in {sdir}", code=130)
    console.print(f"makespan {res.makespan:.1f}s; engine starts per worker: "
                  f"{json.dumps(res.library_starts)}", highlight=False)
    from pcm_service.cli.plots import write_report

    written = write_report(res.history, sdir / "report")
    console.print(f"plots of the run: {written[0]}", highlight=False)
    if sub.openai is None:
        from pcm_service.cli.summary import print_summary

        print_summary(Path(res.status.output), console)
    else:
        console.print(f"failed requests (if any) in {sub.openai.error_output}", highlight=False)
    report_done(res.status)
