"""`pcm factory run|set|show`: the glidein factory daemon and its live tuning."""
from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from pcm_service.cli.common import (
    CaFileOpt,
    EvictCountOpt,
    EvictEveryOpt,
    EvictSignalOpt,
    ServiceOpt,
    TokenFileOpt,
    client_for,
    console,
    eviction_settings,
    fail,
    out,
    setup_logging,
)
from pcm_service.client import ServiceClient, ServiceError
from pcm_service.protocol import Demand, FactoryLimits, FactoryView, GlideinState

if TYPE_CHECKING:
    from factory.daemon import Factory

factory_app = typer.Typer(help="The glidein factory: run it, tune its limits, inspect it.",
                          no_args_is_help=True)

MinOpt = typer.Option(None, "--min", min=0, help="Fewest workers to keep (even with no work)")
MaxOpt = typer.Option(None, "--max", min=0, help="Most workers (glideins) at once")
PerCycleOpt = typer.Option(None, "--per-cycle", min=1, help="Most glideins submitted per cycle")


def _limits(client: ServiceClient, min_: Optional[int], max_: Optional[int],
            per_cycle: Optional[int]) -> FactoryLimits:
    cur: FactoryLimits = client.request("GET", "/factory/limits", response=FactoryLimits)
    data = cur.model_dump()
    for k, v in (("min_workers", min_), ("max_workers", max_), ("per_cycle", per_cycle)):
        if v is not None:
            data[k] = v
    try:
        new = FactoryLimits(**data)
    except ValidationError as e:
        fail(e.errors()[0]["msg"].removeprefix("Value error, "), code=2)
    return client.request("PUT", "/factory/limits", new, FactoryLimits)


@factory_app.command("run")
def factory_run(config: Optional[Path] = typer.Option(
                    None, "--config", "-c", help="factory.yaml (re-read when it changes)"),
                service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
                ca_file: Optional[Path] = CaFileOpt,
                backend: Optional[str] = typer.Option(None, help="Glidein backend: local or htcondor"),
                min_workers: Optional[int] = MinOpt, max_workers: Optional[int] = MaxOpt,
                per_cycle: Optional[int] = PerCycleOpt,
                interval: Optional[float] = typer.Option(None, help="Seconds between cycles"),
                evict_every: Optional[float] = EvictEveryOpt,
                evict_signal: str = EvictSignalOpt,
                evict_count: Optional[int] = EvictCountOpt,
                metrics_port: Optional[int] = typer.Option(
                    None, min=0, max=65535, help="Serve the factory's Prometheus metrics on this port"
                    " (GET /metrics with the metrics token or the API token)"),
                metrics_host: str = typer.Option("127.0.0.1", help="Address of --metrics-port"),
                verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the factory daemon: glideins follow the service's demand within min/max."""
    from factory.backends import BackendError, make_backend
    from factory.config import (
        FactoryConfig,
        FactoryConfigError,
        load_factory_config,
        resolve_pool_token_file,
    )
    from factory.daemon import Factory

    try:
        cfg = load_factory_config(config) if config else FactoryConfig()
        drill = eviction_settings(evict_every, evict_signal, evict_count, None)
        over = {k: v for k, v in (("service", service), ("backend", backend), ("interval", interval),
                                  ("ca_file", str(ca_file.resolve()) if ca_file else None),
                                  ("eviction", drill.model_dump() if drill else None))
                if v is not None}
        cfg = resolve_pool_token_file(FactoryConfig.model_validate({**cfg.model_dump(), **over}))
    except FactoryConfigError as e:
        fail(f"{config or 'factory'}: {e}", code=2)
    except ValidationError as e:
        fail(f"--{e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}", code=2)
    setup_logging(verbose)
    client = client_for(cfg.service, token_file, Path(cfg.ca_file) if cfg.ca_file else None, retry_for=60.0)
    try:
        be = make_backend(cfg)
    except BackendError as e:
        fail(str(e), code=1)
    fac = Factory(client, be, cfg, config_path=config)
    if metrics_port is not None:
        _serve_metrics(fac, metrics_host, metrics_port, token_file)
    try:
        fac.apply_config_limits()
        limits = (_limits(client, min_workers, max_workers, per_cycle)
                  if (min_workers, max_workers, per_cycle) != (None, None, None)
                  else client.request("GET", "/factory/limits", response=FactoryLimits))
    except ServiceError as e:
        fail(e.detail)
    console.print(f"factory {cfg.name!r} ({be.name}) for {client.url}: min {limits.min_workers},"
                  f" max {limits.max_workers}, per cycle {limits.per_cycle}", highlight=False)
    signal.signal(signal.SIGTERM, lambda *_: fac.stop())  # systemd stop
    try:
        fac.run()
    except KeyboardInterrupt:
        pass
    finally:
        be.close()


@factory_app.command("set")
def factory_set(service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
                ca_file: Optional[Path] = CaFileOpt,
                min_workers: Optional[int] = MinOpt,
                max_workers: Optional[int] = MaxOpt, per_cycle: Optional[int] = PerCycleOpt) -> None:
    """Change the factory's limits; the next cycle applies them, and they survive restarts."""
    if (min_workers, max_workers, per_cycle) == (None, None, None):
        fail("nothing to set: give --min, --max and/or --per-cycle", code=2)
    try:
        limits = _limits(client_for(service, token_file, ca_file), min_workers, max_workers, per_cycle)
    except ServiceError as e:
        fail(e.detail)
    out.print(f"min {limits.min_workers}, max {limits.max_workers}, per cycle {limits.per_cycle}")


@factory_app.command("show")
def factory_show(service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
                 ca_file: Optional[Path] = CaFileOpt,
                 as_json: bool = typer.Option(False, "--json", help="Print the raw view as JSON")) -> None:
    """Show the limits, the demand, each factory's glideins by state and its last decisions."""
    client = client_for(service, token_file, ca_file)
    try:
        view: FactoryView = client.request("GET", "/factory", response=FactoryView)
        d: Demand = client.request("GET", "/demand", response=Demand)
    except ServiceError as e:
        fail(e.detail)
    if as_json:
        out.print_json(view.model_dump_json())
        return
    lim = view.limits
    out.print(f"limits: min {lim.min_workers}, max {lim.max_workers}, per cycle {lim.per_cycle}")
    out.print(f"demand: {d.workers_wanted} workers ({d.reason})")
    if not view.reports:
        out.print("no factory has reported yet: start one with `pcm factory run --config factory.yaml`")
    now = time.time()
    for rep in view.reports:
        counts = Counter(g.state.value for g in rep.glideins)
        by_state = ", ".join(f"{counts.get(s.value, 0)} {s.value}" for s in GlideinState)
        out.print(f"\nfactory {rep.factory} ({rep.backend}), last cycle {now - rep.at:.0f}s ago:"
                  f" {by_state}", highlight=False)
        gl = Table(title="Glideins", title_justify="left")
        for col in ("glidein", "state", "for", "host", "gpus", "detail"):
            gl.add_column(col)
        for g in rep.glideins:
            gl.add_row(g.glidein_id, g.state.value, f"{now - g.since:.0f}s" if g.since else "-",
                       g.host or "-", ",".join(g.gpus) or "-", g.detail)
        dec = Table(title="Last decisions", title_justify="left")
        for col in ("when", "wanted", "submit", "remove", "why"):
            dec.add_column(col)
        for x in rep.decisions[-10:]:
            dec.add_row(time.strftime("%H:%M:%S", time.localtime(x.at)), str(x.wanted), str(x.submit),
                        ",".join(x.remove) or "-", x.reason)
        out.print(gl, dec)


def _serve_metrics(fac: "Factory", host: str, port: int, token_file: Optional[Path]) -> None:
    from factory.metrics import serve_metrics
    from pcm_service.tokens import API, METRICS, TokenError, client_token

    try:
        tokens = [t.value for t in (client_token(METRICS), client_token(API, token_file)) if t is not None]
        server = serve_metrics(fac.metrics, host, port, tokens)
    except (TokenError, ValueError, OSError) as e:
        fail(f"--metrics-port {port}: {e}", code=2)
    console.print(f"factory metrics on http://{host}:{server.server_port}/metrics", highlight=False)
