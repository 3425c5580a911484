"""`pcm serve`: the service (HTTP API, SQLite state, the origin of model weights)."""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Optional

import typer

from pcm_service.cli.common import (
    console,
    fail,
    setup_logging,
)
from pcm_service.cli.executors import ExecutorOpt, VinePortOpt, VineProjectOpt, make_executor
from pcm_service.core.config import ServiceConfig
from pcm_service.core.trust import WorkerTrust
from pcm_service.protocol import ExecutorKind
from pcm_service.tokens import Token
from pcm_service.weights.chunks import DEFAULT_CHUNK_SIZE
from pcm_service.weights.replicas import TransferPolicy

log = logging.getLogger("pcm.service")
MIB = 2**20


def serve(state_dir: Path = typer.Option(Path("pcm-state"), help="Where the SQLite state lives"),
          host: str = typer.Option("127.0.0.1", help="Address to listen on"),
          port: int = typer.Option(8642, help="Port to listen on"),
          heartbeat_interval: float = typer.Option(
              ServiceConfig.heartbeat_interval, help="Seconds between worker heartbeats"),
          worker_timeout: float = typer.Option(
              ServiceConfig.worker_timeout,
              help="A worker silent this long is lost: its leases expire, its rows are requeued"),
          idle_timeout: float = typer.Option(ServiceConfig.idle_timeout, help="An idle worker retires after this"),
          pool_token_file: Optional[Path] = typer.Option(
              None, help="Workers must present this file's token [env PCM_POOL_TOKEN_FILE; else env"
                         " PCM_POOL_TOKEN, else STATE_DIR/pool.token, made on first start]",
              envvar="PCM_POOL_TOKEN_FILE"),
          api_token_file: Optional[Path] = typer.Option(
              None, help="Users must present this file's token [env PCM_API_TOKEN_FILE; else env"
                         " PCM_API_TOKEN, else STATE_DIR/api.token, made on first start]",
              envvar="PCM_API_TOKEN_FILE"),
          metrics_token_file: Optional[Path] = typer.Option(
              None, help="Prometheus may read /metrics (only) with this file's token [env"
                         " PCM_METRICS_TOKEN_FILE; else env PCM_METRICS_TOKEN, else STATE_DIR/metrics.token,"
                         " made on first start]; the API token reads it too", envvar="PCM_METRICS_TOKEN_FILE"),
          chunk_size: float = typer.Option(
              DEFAULT_CHUNK_SIZE / MIB, min=0.001,
              help="Largest model chunk in MiB (a model gets >= 64 chunks, >= 1 MiB)"),
          origin_rate: float = typer.Option(
              TransferPolicy.origin_rate / 1e6, min=0, help="The origin's upload MB/s (0: unlimited)"),
          origin_slots: int = typer.Option(
              TransferPolicy.origin_slots, min=1, help="Chunk transfers the origin serves at once"),
          model_root: list[Path] = typer.Option(
              [], "--model-root", help="A directory models may be read from (repeatable); a model"
                                       " path outside every root is refused"),
          output_root: list[Path] = typer.Option(
              [], "--output-root", help="A directory workloads' output files may be written under"
                                        " (repeatable; default: the directory pcm serve runs in); an output"
                                        " elsewhere, or inside the state directory, is refused"),
          peer_network: list[str] = typer.Option(
              [], "--peer-network", help="A network (CIDR) a worker's blob server may be in besides the"
                                         " address its requests come from (repeatable; workers behind NAT)"),
          audit_fraction: float = typer.Option(
              WorkerTrust.audit_fraction, min=0, max=1, help="Share of finished batches run again by a worker"
              " of another host and compared (spot-check audits); a host that disagrees is barred"),
          audit_bar_after: int = typer.Option(
              WorkerTrust.audit_bar_after, min=1, help="Audits decided against a host before it is barred"),
          audit_agreement: float = typer.Option(
              WorkerTrust.audit_agreement, min=0, max=1, help="Share of an audited batch's greedy rows whose"
              " texts must match (below 1 where GPUs of different kinds may differ)"),
          tls_cert: Optional[Path] = typer.Option(None, help="Serve HTTPS with this certificate (PEM)"),
          tls_key: Optional[Path] = typer.Option(None, help="The certificate's private key (PEM, mode 0600)"),
          max_request_mb: float = typer.Option(
              ServiceConfig.max_request_bytes / MIB, min=0.001, help="Largest request body in MiB (else 413)"),
          max_submission_mb: float = typer.Option(
              ServiceConfig.max_submission_bytes / MIB, min=0.001,
              help="Largest workload submission in MiB (it holds every row)"),
          executor: ExecutorKind = ExecutorOpt, vine_port: int = VinePortOpt,
          vine_project: Optional[str] = VineProjectOpt,
          worker_env: Optional[Path] = typer.Option(
              None, "--worker-env", help="A packed worker environment (`pcm env pack`): glideins started with"
              " PCM_ENV=packed fetch it in chunks from here and their peers"),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the PCM service (HTTP API + SQLite state; the origin copy of model weights)."""
    import uvicorn

    from pcm_service.api import create_app, tune_gc_for_serving
    from pcm_service.core import ServiceCore
    from pcm_service.tls import TLSError, check_server_files
    from pcm_service.tokens import API, METRICS, POOL, TokenError, service_token

    try:
        pool_token = service_token(POOL, pool_token_file, state_dir)
        api_token = service_token(API, api_token_file, state_dir)
        metrics_token = service_token(METRICS, metrics_token_file, state_dir)
    except TokenError as e:
        fail(str(e), code=2)
    if worker_env is not None and not worker_env.is_file():
        fail(f"--worker-env {worker_env}: no such file; make one with `pcm env pack -o {worker_env}`", code=2)
    for root in model_root:
        if not root.is_dir():
            fail(f"--model-root {root}: not a directory", code=2)
    outputs = output_roots(output_root, state_dir)
    try:
        trust = WorkerTrust(peer_networks=tuple(ipaddress.ip_network(n, strict=False) for n in peer_network),
                            audit_fraction=audit_fraction, audit_bar_after=audit_bar_after,
                            audit_agreement=audit_agreement)
    except ValueError as e:
        fail(f"--peer-network: {e} (give a network such as 10.1.0.0/16)", code=2)
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together", code=2)
    if tls_cert is not None and tls_key is not None:
        try:
            check_server_files(tls_cert, tls_key)
        except TLSError as e:
            fail(str(e), code=2)
    setup_logging(verbose)
    transfers = TransferPolicy(chunk_size=int(chunk_size * MIB), origin_rate=origin_rate * 1e6,
                               origin_slots=origin_slots)
    secrets = tuple(p for p in (pool_token.path, api_token.path, metrics_token.path, tls_key) if p is not None)
    core = ServiceCore(state_dir, ServiceConfig(
        heartbeat_interval=heartbeat_interval, worker_timeout=worker_timeout, idle_timeout=idle_timeout,
        transfers=transfers, model_roots=tuple(model_root), secret_paths=secrets, trust=trust,
        output_roots=outputs,
        max_request_bytes=int(max_request_mb * MIB), max_submission_bytes=int(max_submission_mb * MIB)))
    if worker_env is not None:
        env = core.replicas.register_environment(worker_env)
        console.print(f"worker environment: {worker_env.resolve()} ({env.bytes / MIB:.0f} MiB,"
                      f" digest {env.digest[:12]})", highlight=False)
    scheme = "https" if tls_cert else "http"
    console.print(f"PCM service on {scheme}://{host}:{port} (state in {state_dir.resolve()})", highlight=False)
    roots = ", ".join(str(r.resolve()) for r in model_root) or "none: every model path is refused"
    console.print(f"model roots: {roots}", highlight=False)
    console.print(f"output roots: {', '.join(map(str, outputs))} (not the state directory)", highlight=False)
    _print_token_use("pool token", pool_token, "workers: `pcm worker --token-file {file}`; factory:"
                     " local.token_file or htcondor.token_file: {file}")
    _print_token_use("API token", api_token, "clients (submit, status, factory):"
                     " --token-file {file} or PCM_API_TOKEN_FILE={file}")
    _print_token_use("metrics token", metrics_token, "Prometheus (GET /metrics):"
                     " authorization: {{credentials_file: {file}}}")
    if scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving plain HTTP on %s: bearer tokens cross the network in clear;"
                    " use --tls-cert/--tls-key (see `pcm tls init`)", host)
    try:
        runner = make_executor(executor, core, pool_token.value, vine_port, vine_project,
                               (tls_key, tls_cert) if tls_cert and tls_key else None)
    except (ImportError, OSError) as e:
        fail(f"--executor {executor.value}: {e}", code=2)
    console.print(runner.describe(), highlight=False)
    app = create_app(core, pool_token.value, api_token.value, runner, metrics_token.value)
    tune_gc_for_serving()
    uvicorn.run(app, host=host, port=port, log_level="warning",
                ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None)


def output_roots(given: list[Path], state_dir: Path) -> tuple[Path, ...]:
    """The directories outputs may be written under (default: the working directory), resolved;
    one inside the state directory exits 2 (outputs there are refused whatever the roots)."""
    for root in given:
        if not root.is_dir():
            fail(f"--output-root {root}: not a directory", code=2)
    state = state_dir.resolve()
    roots = tuple(r.resolve() for r in given) or (Path.cwd().resolve(),)
    for root in roots:
        if root.is_relative_to(state):
            fail(f"--output-root {root}: inside the state directory {state}, where no output is written", code=2)
    return roots


def _print_token_use(what: str, token: Token, how: str) -> None:
    """Where a token is and who needs it; never the token itself."""
    made = " (generated, mode 0600)" if token.generated else ""
    file = str(token.path.resolve()) if token.path else "FILE (mode 0600, holding the same token)"
    console.print(f"{what}: {token.source}{made}; {how.format(file=file)}", highlight=False)
