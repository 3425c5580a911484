"""A million-row workload through `pcm submit` into a real `pcm serve`, and its output.

    python -m bench.ingest [--rows 1000000] [--prompt-bytes 300] [--json-rows 200000]

Measures, in one run: how fast the rows are accepted (from starting `pcm submit` to its
answer), the peak RSS of the service and of the CLI, how long `GET /status` takes while
they stream in, and how long the service takes to write the output once the last row is
done (rows are marked done in SQLite by the benchmark: no engine runs, so only the
service's ingest and output are measured). Side by side, the same service takes
``--json-rows`` rows as one JSON body (`POST /v1/pcm/workloads`, the path before streaming):
the RSS it needs for them, as a ratio to the streamed path.

Goals (issue 15): 1,000,000 rows accepted in <= 60 s with the service's RSS <= 1 GiB; output
written with bounded memory; status under 100 ms throughout.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel

from pcm_service.protocol import (
    BatchReport,
    BatchState,
    ContextState,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RegisterResponse,
    RowResult,
    RowState,
    WorkerRegistration,
)
from pcm_service.workload import load_workload
from tests.support.memory import PeakRss, rss_mb
from tests.support.models import fake_model
from tests.support.serve import ServeProcess

REPO = Path(__file__).resolve().parent.parent


def write_inputs(path: Path, rows: int, prompt_bytes: int) -> None:
    filler = ("The committee reviewed the evidence on the river's course and the survey records "
              * (1 + prompt_bytes // 80))[:prompt_bytes]
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"claim-{i}", "claim": f"{i}: {filler}"}) + "\n")


def write_workload(tmp: Path, name: str, inputs: Path) -> Path:
    wl = tmp / f"{name}.yaml"
    wl.write_text(yaml.safe_dump({
        "name": name, "model": str(tmp / "models" / "m"), "batch_size": 100, "output": f"out/{name}.jsonl",
        "inputs": {"path": str(inputs), "template": "Claim: {claim}\nVerdict:", "id_field": "id"},
        "sampling": {"temperature": 0, "max_tokens": 8}}))
    return wl


class StatusProbe:
    """GET /status every 100 ms; the latencies it saw."""

    def __init__(self, serve: ServeProcess) -> None:
        self.http = httpx.Client(base_url=serve.url, headers={"authorization": f"Bearer {serve.api_token}"},
                                 timeout=30)
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            t0 = time.monotonic()
            self.http.get("/v1/pcm/status").raise_for_status()
            self.seconds.append(time.monotonic() - t0)

    def __enter__(self) -> "StatusProbe":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> str:
        s = sorted(self.seconds)
        if not s:
            return "no calls"
        p95 = s[min(len(s) - 1, int(0.95 * len(s)))]
        return (f"{len(s)} calls, median {statistics.median(s) * 1000:.1f} ms, 95th percentile"
                f" {p95 * 1000:.1f} ms, max {s[-1] * 1000:.1f} ms")


def submit_streamed(serve: ServeProcess, wl: Path) -> tuple[float, float, str]:
    """`pcm submit` as a user runs it: seconds, the CLI's peak RSS, the workload id."""
    t0 = time.monotonic()
    cli = subprocess.Popen([sys.executable, "-m", "pcm_service.cli", "submit", str(wl), "--service", serve.url,
                            "--token-file", str(serve.api_token_file)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cwd=REPO)
    with PeakRss(cli.pid) as cli_rss:
        out, err = cli.communicate()
    if cli.returncode != 0:
        raise SystemExit(f"pcm submit failed: {err.decode()}")
    return time.monotonic() - t0, cli_rss.peak, out.decode().split()[-1]


def finish_output(serve: ServeProcess, wl_id: str) -> tuple[float, int]:
    """Mark every row but one batch done in SQLite, then let a worker report that batch over
    HTTP: the service writes the output in that request. Its seconds, and the output's lines."""
    db = sqlite3.connect(serve.state_dir / "pcm.sqlite3", timeout=60)
    last = db.execute("SELECT MAX(batch_id) FROM batches WHERE workload_id=?", (wl_id,)).fetchone()[0]
    with db:
        n = db.execute("UPDATE rows SET state=?, text='True', finish_reason='stop', prompt_tokens=9,"
                       " completion_tokens=1 WHERE workload_id=? AND batch_id<?",
                       (RowState.DONE.value, wl_id, last)).rowcount
        db.execute("UPDATE batches SET state=? WHERE workload_id=? AND batch_id<?",
                   (BatchState.DONE.value, wl_id, last))
        db.execute("UPDATE workloads SET rows_done=? WHERE workload_id=?", (n, wl_id))
    db.close()
    http = httpx.Client(base_url=serve.url + "/v1/pcm", timeout=600,
                        headers={"authorization": f"Bearer {serve.pool_token}",
                                 "content-type": "application/json"})

    def post(path: str, body: BaseModel, token: str = serve.pool_token) -> Any:
        r = http.post(path, content=body.model_dump_json(), headers={"authorization": f"Bearer {token}"})
        r.raise_for_status()
        return r.json()

    reg = RegisterResponse.model_validate(post("/workers", WorkerRegistration(host="bench", pid=1)))
    wid, own = reg.worker_id, reg.worker_token
    ctx = db_context(serve, wl_id)
    post(f"/workers/{wid}/lease", LeaseRequest(), own)  # told what to load, as an agent is
    post(f"/workers/{wid}/library", LibraryEvent(context_id=ctx, state=ContextState.READY, seconds=0.0), own)
    lease = LeaseResponse.model_validate(post(f"/workers/{wid}/lease", LeaseRequest(
        context_id=ctx, context_state=ContextState.READY, max_batches=1), own))
    [b] = lease.batches
    t0 = time.monotonic()
    post(f"/workers/{wid}/report", BatchReport(batch_id=b.batch_id, results=[
        RowResult(idx=r.idx, text="True", finish_reason="stop") for r in b.rows]), own)
    return time.monotonic() - t0, n + len(b.rows)


def db_context(serve: ServeProcess, wl_id: str) -> str:
    db = sqlite3.connect(serve.state_dir / "pcm.sqlite3")
    try:
        return str(db.execute("SELECT context_id FROM workloads WHERE workload_id=?", (wl_id,)).fetchone()[0])
    finally:
        db.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--prompt-bytes", type=int, default=300)
    p.add_argument("--json-rows", type=int, default=200_000, help="rows sent as one JSON body (0: skip)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pcm-ingest-bench-"))
    model = tmp / "models" / "m"
    fake_model(model)
    inputs = tmp / "inputs.jsonl"
    write_inputs(inputs, args.rows, args.prompt_bytes)
    size_mb = inputs.stat().st_size / 2**20
    print(f"input: {args.rows:,} rows, {size_mb:.0f} MiB of JSONL (prompts of ~{args.prompt_bytes} bytes)",
          flush=True)

    serve = ServeProcess(tmp / "state", model_roots=[tmp / "models"]).start()
    assert serve.proc is not None
    try:
        base = rss_mb(serve.proc.pid)
        with PeakRss(serve.proc.pid) as ingest_rss, StatusProbe(serve) as probe:
            seconds, cli_peak, wl_id = submit_streamed(serve, write_workload(tmp, "big", inputs))
        with PeakRss(serve.proc.pid) as output_rss, StatusProbe(serve) as probe_out:
            out_seconds, lines = finish_output(serve, wl_id)
        out_file = tmp / "out" / "big.jsonl"
        written = sum(1 for _ in out_file.open())
        json_line = ""
        if args.json_rows:
            small = tmp / "small.jsonl"
            write_inputs(small, args.json_rows, args.prompt_bytes)
            sub = load_workload(write_workload(tmp, "small", small))
            client = serve.client()
            before_stream = rss_mb(serve.proc.pid)
            with PeakRss(serve.proc.pid) as stream_rss:
                stream_seconds, _, _ = submit_streamed(serve, write_workload(tmp, "small2", small))
            before_json = rss_mb(serve.proc.pid)
            with PeakRss(serve.proc.pid) as json_rss:
                t0 = time.monotonic()
                client.request("POST", "/workloads", sub)
                json_seconds = time.monotonic() - t0
            del sub
            json_growth, stream_growth = json_rss.peak - before_json, stream_rss.peak - before_stream
            json_line = (f"\n{args.json_rows:,} rows, service RSS growth: one JSON body {json_growth:.0f} MiB"
                         f" ({json_seconds:.1f} s), streamed {max(stream_growth, 0):.0f} MiB ({stream_seconds:.1f} s);"
                         f" JSON / streamed = {json_growth / max(stream_growth, 1):.1f}x")
    finally:
        serve.stop()
    print(f"accepted: {args.rows:,} rows in {seconds:.1f} s = {args.rows / seconds:,.0f} rows/s"
          f" ({size_mb / seconds:.1f} MiB/s)")
    print(f"service RSS: {base:.0f} MiB before, peak {ingest_rss.peak:.0f} MiB while ingesting;"
          f" pcm submit peak RSS {cli_peak:.0f} MiB")
    print(f"GET /status while ingesting: {probe.summary()}")
    print(f"output: {written:,} lines ({lines:,} rows) written in {out_seconds:.1f} s;"
          f" service peak RSS {output_rss.peak:.0f} MiB meanwhile; GET /status meanwhile: {probe_out.summary()}"
          + json_line)
    ok = seconds <= 60 and ingest_rss.peak <= 1024 and output_rss.peak <= 1024
    print(f"goal (<= 60 s, service RSS <= 1 GiB): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
