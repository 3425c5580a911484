"""`pcm submit` and `pcm status`: a user's work against a running service."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from pcm_service.cli.common import (
    BatchSizeOpt,
    CaFileOpt,
    EngineArgOpt,
    ModelOpt,
    OutputOpt,
    ServiceOpt,
    TokenFileOpt,
    client_for,
    console,
    fail,
    load_workload_stream_file,
    out,
    progress_until_done,
    report_done,
    sending_progress,
)
from pcm_service.client import ServiceError
from pcm_service.protocol import ServiceStatus, SubmitResponse, WorkloadStatus
from pcm_service.workload import WorkloadError

WIDE = 200  # columns of `pcm status --wide`


def submit(workload: Path = typer.Argument(..., help="Workload YAML file, or an OpenAI Batch input file (.jsonl)"),
           model: Optional[str] = ModelOpt, engine_arg: list[str] = EngineArgOpt,
           batch_size: int = BatchSizeOpt, output: Optional[Path] = OutputOpt,
           service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
           ca_file: Optional[Path] = CaFileOpt,
           wait: bool = typer.Option(False, "--wait", help="Show progress until the output is written")) -> None:
    """Submit a workload to a running service."""
    header, rows = load_workload_stream_file(workload, model, engine_arg, batch_size, output)
    client = client_for(service, token_file, ca_file)
    try:  # rows are read, checked and sent as they go: a million rows never sit in memory
        with sending_progress(header.name) as sent:
            resp: SubmitResponse = client.submit_stream(header, rows, sent)
    except WorkloadError as e:  # a bad line: the request was cut off, the service kept nothing
        fail(f"{workload}: {e}", code=2)
    except ServiceError as e:
        fail(e.detail, code=2 if 400 <= e.status < 500 else 1)
    console.print(f"submitted {resp.workload_id}: {resp.rows} rows in {resp.batches} batches"
                  f" (context {resp.context_id})", highlight=False)
    out.print(resp.workload_id)
    if wait:
        def fetch() -> WorkloadStatus:
            time.sleep(0.5)
            return client.request("GET", f"/workloads/{resp.workload_id}", response=WorkloadStatus)
        report_done(progress_until_done(fetch, resp.rows, header.name))


def status(service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
           ca_file: Optional[Path] = CaFileOpt,
           watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until interrupted"),
           interval: float = typer.Option(2.0, help="Refresh interval for --watch"),
           as_json: bool = typer.Option(False, "--json", help="Print the raw status as JSON"),
           wide: bool = typer.Option(False, "--wide", help="Every column, full ids, hold reasons (wide terminals)"),
           all_workers: bool = typer.Option(False, "--all", help="Include retired and lost workers")) -> None:
    """Workloads (done/total, rows/s, ETA), the pool (glideins, workers, contexts, demand), workers."""
    from rich.console import Console, Group, RenderableType

    from pcm_service.cli.status_compact import RecentRates, render_compact
    from pcm_service.cli.status_view import render_status

    client = client_for(service, token_file, ca_file)
    rates = RecentRates()

    def render(st: ServiceStatus, watching: bool = False) -> RenderableType:
        if wide:
            return render_status(st)
        if not watching:
            return render_compact(st)
        rates.add(st)
        head = f"Every {interval:g}s: pcm status, {time.strftime('%H:%M:%S')}; rows/s over the last minute"
        return Group(head, "", render_compact(st, rates))

    def fetch() -> ServiceStatus:
        try:
            return client.request("GET", "/status", response=ServiceStatus, all=all_workers)
        except ServiceError as e:
            fail(e.detail)

    if as_json:
        out.print_json(fetch().model_dump_json())
        return
    if not watch:
        # --wide: as wide as the tables need (the terminal wraps them), never cut to fit it
        (Console(width=max(out.width, WIDE)) if wide else out).print(render(fetch()))
        return
    from rich.live import Live

    with Live(render(fetch(), True), console=out, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render(fetch(), True), refresh=True)
        except KeyboardInterrupt:
            pass


def report(workload_id: Optional[str] = typer.Argument(None, help="One workload's span (default: the whole service)"),
           output: Path = typer.Option(Path("pcm-report"), "--output", "-o", help="Directory for the plots"),
           service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
           ca_file: Optional[Path] = CaFileOpt) -> None:
    """Plots of a run from the service's records (pool by worker state, rows done, engine starts,
    context states, weight bytes by source) and an index.html with a summary table."""
    from pcm_service.cli.plots import write_report
    from pcm_service.protocol import RunHistory

    client = client_for(service, token_file, ca_file)
    try:
        history = client.request("GET", "/history", response=RunHistory,
                                 **({"workload_id": workload_id} if workload_id else {}))
    except ServiceError as e:
        fail(e.detail)
    written = write_report(history, output)
    out.print(f"report: {written[0]} ({len(written) - 1} plots in {output})", highlight=False)
