"""`pcm worker`: the worker agent a glidein runs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcm_service.cli.common import (
    CaFileOpt,
    ServiceOpt,
    fail,
    setup_logging,
    token_from,
)
from pcm_service.client import ServiceError, default_service_url
from worker_image.settings import DEFAULTS, PeerSettings


def worker(service: Optional[str] = ServiceOpt,
           glidein_id: Optional[str] = typer.Option(None, help="Batch-system id of this glidein"),
           work_dir: Optional[Path] = typer.Option(None, help="Scratch directory (logs, context files)"),
           idle_timeout: Optional[float] = typer.Option(None, help="Override the service's idle timeout"),
           target_rows: int = typer.Option(DEFAULTS.target_rows, min=0,
                                            help="Rows to keep in flight in the engine (0: twice its max_num_seqs)"),
           start_timeout: float = typer.Option(
               DEFAULTS.start_timeout, help="Seconds allowed for the engine to start"),
           drain_timeout: float = typer.Option(
               DEFAULTS.drain_timeout,
               help="On SIGTERM, seconds to let in-flight rows finish before handing the rest back"
                    " (keep it well under HTCondor's MachineMaxVacateTime, 10 s by default)"),
           token_file: Optional[Path] = typer.Option(
               None, help="File holding the pool token [env PCM_TOKEN_FILE]", envvar="PCM_TOKEN_FILE"),
           ca_file: Optional[Path] = CaFileOpt,
           serve_blobs: bool = typer.Option(True, "--serve-blobs/--no-serve-blobs",
                                            help="Serve verified model chunks to peers"),
           blob_host: Optional[str] = typer.Option(
               None, help="Address peers reach this worker on (default: the one facing the service)"),
           blob_port: int = typer.Option(PeerSettings.port, min=0, help="Blob server port (0: any free one)"),
           blob_url: Optional[str] = typer.Option(
               None, help="The URL peers use for this worker's blob server when it differs from where"
                          " it listens (NAT, port forwarding)"),
           upload_rate: float = typer.Option(
               PeerSettings.upload_rate / 1e6, min=0, help="Upload MB/s to peers (0: unlimited)"),
           upload_slots: int = typer.Option(PeerSettings.upload_slots, min=1, help="Chunk uploads to peers at once"),
           fetch_parallel: int = typer.Option(PeerSettings.fetch_parallel, min=1, help="Chunk downloads at once"),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run a worker agent (what a glidein runs)."""
    from worker_image.glidein import run_glidein

    token = token_from(token_file, "--token-file")
    if token is None:
        fail("the service refuses workers without its pool token: pass --token-file STATE_DIR/pool.token"
             " (STATE_DIR: the --state-dir of `pcm serve`) or set PCM_TOKEN_FILE", code=2)
    setup_logging(verbose)
    peers = PeerSettings(serve=serve_blobs, host=blob_host, port=blob_port, url=blob_url,
                         upload_rate=upload_rate * 1e6, upload_slots=upload_slots, fetch_parallel=fetch_parallel)
    try:
        rc = run_glidein(service or default_service_url(), token=token, ca_file=ca_file, glidein_id=glidein_id,
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
