"""The `pcm` command line: thin over the service client, the core and the worker agent."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from pcm_service.cli_common import (
    CaFileOpt,
    ServiceOpt,
    TokenFileOpt,
    client_for,
    console,
    eviction_settings,
    fail,
    out,
    setup_logging,
    token_from,
)
from pcm_service.cli_factory import factory_app
from pcm_service.client import ServiceError, default_service_url
from pcm_service.protocol import ServiceStatus, SubmitResponse, WorkloadStatus
from pcm_service.tokens import Token
from pcm_service.workload import WorkloadError, load_workload

log = logging.getLogger("pcm.service")
app = typer.Typer(help="PCM: throughput LLM inference on opportunistic HTCondor GPU slots.",
                  no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
tls_app = typer.Typer(help="TLS for the service's API.", no_args_is_help=True)
app.add_typer(factory_app, name="factory")
app.add_typer(model_app, name="model")
app.add_typer(tls_app, name="tls")


def _load(path: Path):  # type: ignore[no-untyped-def]
    try:
        return load_workload(path)
    except WorkloadError as e:
        fail(f"{path}: {e}", code=2)


@app.command()
def serve(state_dir: Path = typer.Option(Path("pcm-state"), help="Where the SQLite state lives"),
          host: str = typer.Option("127.0.0.1", help="Address to listen on"),
          port: int = typer.Option(8642, help="Port to listen on"),
          heartbeat_interval: float = typer.Option(2.0, help="Seconds between worker heartbeats"),
          worker_timeout: float = typer.Option(
              10.0, help="A worker silent this long is lost: its leases expire, its rows are requeued"),
          idle_timeout: float = typer.Option(60.0, help="An idle worker retires after this"),
          pool_token_file: Optional[Path] = typer.Option(
              None, help="Workers must present this file's token [env PCM_POOL_TOKEN_FILE; else env"
                         " PCM_POOL_TOKEN, else STATE_DIR/pool.token, made on first start]",
              envvar="PCM_POOL_TOKEN_FILE"),
          api_token_file: Optional[Path] = typer.Option(
              None, help="Users must present this file's token [env PCM_API_TOKEN_FILE; else env"
                         " PCM_API_TOKEN, else STATE_DIR/api.token, made on first start]",
              envvar="PCM_API_TOKEN_FILE"),
          chunk_size: float = typer.Option(
              64, min=0.001, help="Largest model chunk in MiB (a model gets >= 64 chunks, >= 1 MiB)"),
          origin_rate: float = typer.Option(0, min=0, help="The origin's upload MB/s (0: unlimited)"),
          origin_slots: int = typer.Option(4, min=1, help="Chunk transfers the origin serves at once"),
          model_root: list[Path] = typer.Option(
              [], "--model-root", help="A directory models may be read from (repeatable); a model"
                                       " path outside every root is refused"),
          tls_cert: Optional[Path] = typer.Option(None, help="Serve HTTPS with this certificate (PEM)"),
          tls_key: Optional[Path] = typer.Option(None, help="The certificate's private key (PEM, mode 0600)"),
          max_request_mb: float = typer.Option(64, min=0.001, help="Largest request body in MiB (else 413)"),
          max_submission_mb: float = typer.Option(
              1024, min=0.001, help="Largest workload submission in MiB (it holds every row)"),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the PCM service (HTTP API + SQLite state; the origin copy of model weights)."""
    import uvicorn

    from pcm_service.api import create_app
    from pcm_service.core import ServiceConfig, ServiceCore
    from pcm_service.tls import TLSError, check_server_files
    from pcm_service.tokens import API, POOL, TokenError, service_token
    from pcm_service.weights.replicas import TransferPolicy

    try:
        pool_token = service_token(POOL, pool_token_file, state_dir)
        api_token = service_token(API, api_token_file, state_dir)
    except TokenError as e:
        fail(str(e), code=2)
    for root in model_root:
        if not root.is_dir():
            fail(f"--model-root {root}: not a directory", code=2)
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together", code=2)
    if tls_cert is not None and tls_key is not None:
        try:
            check_server_files(tls_cert, tls_key)
        except TLSError as e:
            fail(str(e), code=2)
    setup_logging(verbose)
    transfers = TransferPolicy(chunk_size=int(chunk_size * 2**20), origin_rate=origin_rate * 1e6,
                               origin_slots=origin_slots)
    secrets = tuple(p for p in (pool_token.path, api_token.path, tls_key) if p is not None)
    core = ServiceCore(state_dir, ServiceConfig(
        heartbeat_interval=heartbeat_interval, worker_timeout=worker_timeout, idle_timeout=idle_timeout,
        transfers=transfers, model_roots=tuple(model_root), secret_paths=secrets,
        max_request_bytes=int(max_request_mb * 2**20), max_submission_bytes=int(max_submission_mb * 2**20)))
    scheme = "https" if tls_cert else "http"
    console.print(f"PCM service on {scheme}://{host}:{port} (state in {state_dir.resolve()})", highlight=False)
    roots = ", ".join(str(r.resolve()) for r in model_root) or "none: every model path is refused"
    console.print(f"model roots: {roots}", highlight=False)
    _print_token_use("pool token", pool_token, "workers: `pcm worker --token-file {file}`; factory:"
                     " local.token_file or htcondor.token_file: {file}")
    _print_token_use("API token", api_token, "clients (submit, status, factory):"
                     " --token-file {file} or PCM_API_TOKEN_FILE={file}")
    if scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving plain HTTP on %s: bearer tokens cross the network in clear;"
                    " use --tls-cert/--tls-key (see `pcm tls init`)", host)
    uvicorn.run(create_app(core, pool_token.value, api_token.value), host=host, port=port,
                log_level="warning", ssl_certfile=str(tls_cert) if tls_cert else None,
                ssl_keyfile=str(tls_key) if tls_key else None)


def _print_token_use(what: str, token: Token, how: str) -> None:
    """Where a token is and who needs it; never the token itself."""
    made = " (generated, mode 0600)" if token.generated else ""
    file = str(token.path.resolve()) if token.path else "FILE (mode 0600, holding the same token)"
    console.print(f"{what}: {token.source}{made}; {how.format(file=file)}", highlight=False)


def _progress_bar():  # type: ignore[no-untyped-def]
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:.1f} rows/s"), TimeElapsedColumn(), console=console)


def _progress_until_done(fetch, total: int, label: str) -> WorkloadStatus:  # type: ignore[no-untyped-def]
    with _progress_bar() as bar:
        task = bar.add_task(label, total=total, rate=0.0)
        while True:
            st = fetch()
            bar.update(task, completed=st.rows_done, rate=st.rows_per_second)
            if st.state.value == "completed":
                return st


def _report_done(st: WorkloadStatus) -> None:
    failed = f", [yellow]{st.rows_failed} failed[/yellow]" if st.rows_failed else ""
    console.print(f"[green]done:[/green] {st.rows_done} rows{failed}; results in {st.output}",
                  highlight=False)
    out.print(st.output, highlight=False)


@app.command()
def submit(workload: Path = typer.Argument(..., help="Workload YAML file"),
           service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
           ca_file: Optional[Path] = CaFileOpt,
           wait: bool = typer.Option(False, "--wait", help="Show progress until the output is written")) -> None:
    """Submit a workload to a running service."""
    sub = _load(workload)
    client = client_for(service, token_file, ca_file)
    try:
        resp: SubmitResponse = client.request("POST", "/workloads", sub, SubmitResponse)
    except ServiceError as e:
        fail(e.detail, code=2 if 400 <= e.status < 500 else 1)
    console.print(f"submitted {resp.workload_id}: {resp.rows} rows in {resp.batches} batches"
                  f" (context {resp.context_id})", highlight=False)
    out.print(resp.workload_id)
    if wait:
        def fetch() -> WorkloadStatus:
            time.sleep(0.5)
            return client.request("GET", f"/workloads/{resp.workload_id}", response=WorkloadStatus)
        _report_done(_progress_until_done(fetch, resp.rows, sub.name))


@app.command()
def status(service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
           ca_file: Optional[Path] = CaFileOpt,
           watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until interrupted"),
           interval: float = typer.Option(2.0, help="Refresh interval for --watch"),
           as_json: bool = typer.Option(False, "--json", help="Print the raw status as JSON"),
           all_workers: bool = typer.Option(False, "--all", help="Include retired and lost workers")) -> None:
    """Show workers (state, context) and workloads (rows done/total, rate)."""
    from pcm_service.status_view import render_status

    client = client_for(service, token_file, ca_file)

    def fetch() -> ServiceStatus:
        try:
            return client.request("GET", "/status", response=ServiceStatus, all=all_workers)
        except ServiceError as e:
            fail(e.detail)

    if as_json:
        out.print_json(fetch().model_dump_json())
        return
    if not watch:
        out.print(render_status(fetch()))
        return
    from rich.live import Live

    with Live(render_status(fetch()), console=out, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render_status(fetch()), refresh=True)
        except KeyboardInterrupt:
            pass


@app.command()
def run(workload: Path = typer.Argument(..., help="Workload YAML file"),
        workers: int = typer.Option(1, min=1, help="Most local workers to start"),
        state_dir: Optional[Path] = typer.Option(None, help="Service state and logs (default: a temp dir)"),
        idle_timeout: float = typer.Option(30.0, help="Seconds an idle worker waits before retiring"),
        evict_every: Optional[float] = typer.Option(
            None, min=0.1, help="Eviction drill: evict a random warm worker every this many seconds"),
        evict_signal: str = typer.Option("kill", help="Eviction drill: kill (SIGKILL) or term (vacate)"),
        evict_count: Optional[int] = typer.Option(None, min=1, help="Eviction drill: stop after this many"),
        seed: Optional[int] = typer.Option(None, help="Eviction drill: random seed")) -> None:
    """Run a workload on this machine: embedded service, local factory, local workers."""
    from pcm_service.core import ServiceConfig
    from pcm_service.embedded import run_workload

    sub = _load(workload)
    eviction = eviction_settings(evict_every, evict_signal, evict_count, seed)
    sdir = state_dir or Path(tempfile.mkdtemp(prefix="pcm-run-"))
    console.print(f"running {sub.name}: {len(sub.rows)} rows, batch size {sub.batch_size},"
                  f" up to {workers} worker(s); state and logs in {sdir}", highlight=False)
    with _progress_bar() as bar:
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
    _report_done(res.status)


@app.command()
def worker(service: Optional[str] = ServiceOpt,
           glidein_id: Optional[str] = typer.Option(None, help="Batch-system id of this glidein"),
           work_dir: Optional[Path] = typer.Option(None, help="Scratch directory (logs, context files)"),
           idle_timeout: Optional[float] = typer.Option(None, help="Override the service's idle timeout"),
           target_rows: int = typer.Option(64, min=1, help="Rows to keep in flight in the engine"),
           start_timeout: float = typer.Option(900.0, help="Seconds allowed for the engine to start"),
           drain_timeout: float = typer.Option(
               1.0, help="On SIGTERM, seconds to let in-flight rows finish before handing the rest back"
                         " (keep it well under HTCondor's MachineMaxVacateTime, 10 s by default)"),
           token_file: Optional[Path] = typer.Option(
               None, help="File holding the pool token [env PCM_TOKEN_FILE]", envvar="PCM_TOKEN_FILE"),
           ca_file: Optional[Path] = CaFileOpt,
           serve_blobs: bool = typer.Option(True, "--serve-blobs/--no-serve-blobs",
                                            help="Serve verified model chunks to peers"),
           blob_host: Optional[str] = typer.Option(
               None, help="Address peers reach this worker on (default: the one facing the service)"),
           blob_port: int = typer.Option(0, min=0, help="Blob server port (0: any free one)"),
           blob_url: Optional[str] = typer.Option(
               None, help="The URL peers use for this worker's blob server when it differs from where"
                          " it listens (NAT, port forwarding)"),
           upload_rate: float = typer.Option(0, min=0, help="Upload MB/s to peers (0: unlimited)"),
           upload_slots: int = typer.Option(2, min=1, help="Chunk uploads to peers at once"),
           fetch_parallel: int = typer.Option(4, min=1, help="Chunk downloads at once"),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run a worker agent (what a glidein runs)."""
    from worker_image.agent import PeerSettings, run_worker

    token = token_from(token_file, "--token-file")
    if token is None:
        fail("the service refuses workers without its pool token: pass --token-file STATE_DIR/pool.token"
             " (STATE_DIR: the --state-dir of `pcm serve`) or set PCM_TOKEN_FILE", code=2)
    setup_logging(verbose)
    peers = PeerSettings(serve=serve_blobs, host=blob_host, port=blob_port, url=blob_url,
                         upload_rate=upload_rate * 1e6, upload_slots=upload_slots, fetch_parallel=fetch_parallel)
    try:
        rc = run_worker(service or default_service_url(), token=token, ca_file=ca_file, glidein_id=glidein_id,
                        work_dir=work_dir, idle_timeout=idle_timeout, target_rows=target_rows,
                        start_timeout=start_timeout, drain_timeout=drain_timeout, peers=peers)
    except ServiceError as e:
        if e.status == 0:  # unreachable for the whole retry window, or its certificate refused
            fail(e.detail)
        if e.status not in (401, 403):
            raise
        fail(f"the service refused the pool token in {token_file}: pass --token-file with the"
             " service's STATE_DIR/pool.token (or the file its --pool-token-file names)", code=2)
    raise typer.Exit(rc)


@tls_app.command("init")
def tls_init(out_dir: Path = typer.Argument(..., help="Directory for ca.pem, server.pem and server.key"),
             host: list[str] = typer.Option([], "--host", help="Another name or address clients use"
                                                                " for the service (repeatable)"),
             days: int = typer.Option(365, min=1, help="Validity of the certificates")) -> None:
    """A self-signed CA and a server certificate for a test deployment (production: your site's CA)."""
    from pcm_service.tls import default_hosts, make_test_ca

    hosts = sorted(set(default_hosts()) | set(host))
    paths = make_test_ca(out_dir, hosts, days)
    console.print(f"server certificate for {', '.join(hosts)} (valid {days} days); the CA's key is not kept",
                  highlight=False)
    console.print(f"service: pcm serve --tls-cert {paths['cert']} --tls-key {paths['key']} ...\n"
                  f"clients, factory, workers: --ca-file {paths['ca']} (or PCM_CA_FILE={paths['ca']})",
                  highlight=False)
    out.print(paths["ca"], highlight=False)


@model_app.command("make-tiny")
def make_tiny(out_dir: Path = typer.Argument(..., help="Directory to write the model to"),
              seed: int = typer.Option(0, help="Random seed for the weights")) -> None:
    """Build a tiny random-weight Llama + byte-level BPE tokenizer (no hub access needed)."""
    from pcm_service.tinymodel import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed)
    out.print(f"tiny model written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
