"""The control plane alone: a real `pcm serve` and K simulated workers that speak the worker
protocol over HTTP (register, engine ready, heartbeats as the agent sends them, lease, report)
and answer every row at once, so what is measured is the service: rows/s and batch round trips
(lease + report) per second (one batch per lease and per report unless ``--batches-per-lease``),
and the service's CPU per 1,000 rows.

    python -m bench.controlplane [--workers 16,64,256] [--batch-sizes 10,100] [--seconds 20]

The workers run as asyncio tasks in ``--procs`` client processes, each with its own
keep-alive HTTP connection. ``--repeat N`` runs the whole table N times, the cases interleaved
(so a slow minute of the machine hits every K alike), and prints each case's median run.
Client and service share this machine's cores, so the figures are lower bounds for the
service on its own machine. Goals (issue 15), with K = 256: >= 20,000 rows/s at batch size
100, >= 500 round trips/s at batch size 10, and no drop as K grows from 16 to 256.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pcm_service.protocol import ContextState, RowIn, WorkloadHeader
from tests.support.models import fake_model
from tests.support.serve import ServeProcess
from worker_image.agent import FULL_HEARTBEAT_EVERY

READY = ContextState.READY.value


class Http:
    """A minimal HTTP/1.1 keep-alive client over one asyncio connection: the load generator
    must cost far less per request than the service (httpx's async pool costs as much)."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.bearer(token)

    def bearer(self, token: str) -> None:
        """Send this credential from now on (a worker's own, once it registered)."""
        self.head = f"Host: {self.host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"

    async def open(self) -> "Http":
        self.r, self.w = await asyncio.open_connection(self.host, self.port)
        return self

    async def post(self, path: str, body: Any) -> Any:
        data = json.dumps(body).encode()
        self.w.write(f"POST /v1/pcm{path} HTTP/1.1\r\n{self.head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status = int((await self.r.readline()).split()[1])
        length = 0
        while (line := await self.r.readline()) != b"\r\n":
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.r.readexactly(length)
        if status >= 400:
            raise RuntimeError(f"{path}: {status} {payload[:200]!r}")
        return json.loads(payload)

    def close(self) -> None:
        self.w.close()


async def worker(http: Http, ctx: str, stop_at: float, hb_every: float, per_lease: int,
                 counts: list[int]) -> None:
    """One simulated worker: lease ``per_lease`` batches, report all their rows at once, repeat."""
    reg = await http.post("/workers", {"host": "sim", "pid": os.getpid()})
    wid = reg["worker_id"]
    http.bearer(reg["worker_token"])  # the pool token only registers
    await http.post(f"/workers/{wid}/lease", {"max_batches": 0})  # told what to load, as an agent is
    await http.post(f"/workers/{wid}/library", {"context_id": ctx, "state": READY, "seconds": 0.0})
    seq, next_tick, beat_at = 0, time.monotonic() + hb_every, 0.0
    alive_at = time.monotonic()
    while (now := time.monotonic()) < stop_at:
        if now >= next_tick:  # the agent's rule (WorkerAgent._heartbeat_due): leases and reports keep it alive
            if now - alive_at >= hb_every or now - beat_at >= FULL_HEARTBEAT_EVERY * hb_every:
                await http.post(f"/workers/{wid}/heartbeat", {
                    "context_id": ctx, "context_state": READY, "inflight_batches": 0, "batches": [],
                    "lease_seq": seq})
                beat_at = now
            next_tick += hb_every
        r = await http.post(f"/workers/{wid}/lease", {"context_id": ctx, "context_state": READY,
                                                          "max_batches": per_lease})
        alive_at = time.monotonic()
        seq = r["lease_seq"]
        if not r["batches"]:
            await asyncio.sleep(0.05)
            continue
        reports = [{"batch_id": b["batch_id"], "results": [
            {"idx": row["idx"], "text": "True", "finish_reason": "stop", "prompt_tokens": 9, "completion_tokens": 1}
            for row in b["rows"]]} for b in r["batches"]]
        await http.post(f"/workers/{wid}/reports", {"reports": reports})
        alive_at = time.monotonic()
        counts[0] += sum(len(b["rows"]) for b in r["batches"])
        counts[1] += len(r["batches"])


def client_process(url: str, token: str, ctx: str, n: int, start_at: float, seconds: float,
                   hb_every: float, per_lease: int, out: Any) -> None:
    async def run() -> list[int]:
        counts = [0, 0]
        host, port = url.removeprefix("http://").split(":")
        conns = [await Http(host, int(port), token).open() for _ in range(n)]  # one per worker
        await asyncio.sleep(max(0.0, start_at - time.time()))
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(worker(c, ctx, stop_at, hb_every, per_lease, counts) for c in conns))
        for c in conns:
            c.close()
        return counts

    out.put(asyncio.run(run()))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(serve: ServeProcess, model: Path, k: int, batch: int, args: argparse.Namespace) -> dict[str, float]:
    client = serve.client(timeout=600)
    n_rows = args.rows or int(50_000 * args.seconds)
    rows = (RowIn(row_id=str(i), prompt=f"claim {i}") for i in range(n_rows))
    header = WorkloadHeader(name=f"cp-{k}-{batch}", context={"model": str(model)},  # type: ignore[arg-type]
                            batch_size=batch, output=str(serve.state_dir.parent / f"out-{k}-{batch}.jsonl"))
    sub = client.submit_stream(header, rows)
    procs, q = [], mp.get_context("spawn").Queue()
    start_at = time.time() + 3.0  # every process connected before the clock starts
    per = [k // args.procs + (i < k % args.procs) for i in range(args.procs)]
    for n in per:
        if n:
            p = mp.get_context("spawn").Process(target=client_process, args=(
                serve.url, serve.pool_token, sub.context_id, n, start_at, args.seconds, args.heartbeat,
                args.batches_per_lease, q))
            p.start()
            procs.append(p)
    assert serve.proc is not None
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = cpu_seconds(serve.proc.pid)
    results = [q.get(timeout=args.seconds + 300) for _ in procs]
    cpu = cpu_seconds(serve.proc.pid) - cpu0
    for p in procs:
        p.join()
    done = sum(r[0] for r in results)
    trips = sum(r[1] for r in results)
    return {"rows_s": done / args.seconds, "trips_s": trips / args.seconds,
            "cpu_per_1k": cpu / max(done, 1) * 1000, "rows": done}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="16,64,256")
    p.add_argument("--batch-sizes", default="10,100")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per case")
    p.add_argument("--rows", type=int, default=0, help="rows queued per case (default: 50,000 per second measured)")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between a worker's heartbeats")
    p.add_argument("--batches-per-lease", type=int, default=1,
                   help="batches a worker leases (and reports) per request; a real agent leases what"
                        " keeps 2 x max_num_seqs rows in flight")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the table this many times, cases interleaved; print each case's median")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pcm-controlplane-"))
    model = tmp / "models" / "m"
    fake_model(model)
    cases = [(k, int(b)) for b in args.batch_sizes.split(",") for k in (int(w) for w in args.workers.split(","))]
    runs: dict[tuple[int, int], list[dict[str, float]]] = {c: [] for c in cases}
    for rep in range(args.repeat):
        for k, batch in cases:
            serve = ServeProcess(tmp / f"state-{k}-{batch}-{rep}", "--worker-timeout", "600",
                                 model_roots=[tmp / "models"]).start()
            try:
                r = run_case(serve, model, k, batch, args)
            finally:
                serve.stop()
            runs[(k, batch)].append(r)
            print(f"{'run ' + str(rep + 1) + ' ' if args.repeat > 1 else ''}{line(k, batch, r)}", flush=True)
    if args.repeat > 1:
        print(f"median of {args.repeat} runs:")
        for k, batch in cases:
            print(line(k, batch, median_run(runs[(k, batch)])))
    print(json.dumps([{"workers": k, "batch_size": b, "runs": runs[(k, b)]} for k, b in cases]))


def line(k: int, batch: int, r: dict[str, float]) -> str:
    return (f"K={k:4d} batch={batch:4d}: {r['rows_s']:9,.0f} rows/s {r['trips_s']:7,.0f} batch round trips/s"
            f"  service CPU {r['cpu_per_1k']:.3f} s per 1,000 rows")


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run whose rows/s is the median (its own CPU figure beside it, not a mix of runs)."""
    return sorted(runs, key=lambda r: r["rows_s"])[len(runs) // 2]


if __name__ == "__main__":
    main()
