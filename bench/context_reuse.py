"""PCM (context kept alive) vs. reload-per-batch (a fresh vLLM engine for every batch).

The baseline is what a job-per-batch HTCondor workflow does: each batch is a job
that starts Python, loads the engine, generates its rows, and exits. It runs with
as many concurrent slots as PCM has workers.

    python -m bench.context_reuse [--rows 300] [--batch-size 10] [--workers 2]

Prints both makespans, their ratio, and PCM's makespan over the ideal (one engine
start per worker + pure generation time, both measured in this run).
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pcm_service.cli.embedded import run_workload
from pcm_service.protocol import ContextSpec, EngineSettings, RowIn, SamplingSettings, WorkloadSubmission

REPO = Path(__file__).resolve().parent.parent

ONE_BATCH = r"""
import json, sys, time
t0 = float(sys.argv[2])
if __name__ == "__main__":
    from vllm import LLM
    from pcm_service.protocol import EngineSettings, SamplingSettings
    from worker_image.engines import VllmEngine
    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["model"], **EngineSettings(**job["engine"]).engine_args())
    t1 = time.time()
    llm.generate(job["prompts"], VllmEngine.sampling_params(SamplingSettings(**job["sampling"])), use_tqdm=False)
    t2 = time.time()
    json.dump({"start": t1 - t0, "generate": t2 - t1}, open(sys.argv[3], "w"))
"""

ENGINE: dict[str, Any] = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True,
                          "kv_cache_memory_bytes": 256 * 2**20}


TINY_MODEL = REPO / "build/models/tiny-llama"


def ensure_model(model: Path) -> Path:
    """The benchmarks' ``--model``: the tiny model is built there when it is missing."""
    if not (model / "config.json").exists():
        from pcm_service.cli.tinymodel import make_tiny_model
        make_tiny_model(model)
    return model


def prompts(n: int) -> list[str]:
    rows = [json.loads(x) for x in (REPO / "configs/workloads/claims.jsonl").read_text().splitlines()]
    return [f"Claim: {rows[i % len(rows)]['claim']}\nVerdict:" for i in range(n)]


def run_pcm(model: Path, ps: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    sub = WorkloadSubmission(
        name="bench", batch_size=args.batch_size, output=str(tmp / "pcm.jsonl"),
        context=ContextSpec(model=str(model), engine=EngineSettings(**ENGINE)),
        sampling=SamplingSettings(temperature=0, max_tokens=args.max_tokens),
        rows=[RowIn(row_id=str(i), prompt=p) for i, p in enumerate(ps)])
    res = run_workload(sub, tmp / "pcm", workers=args.workers)
    db = sqlite3.connect(tmp / "pcm" / "service" / "pcm.sqlite3")
    starts = [r[0] for r in db.execute("SELECT seconds FROM library_events WHERE state='ready'")]
    return {"makespan": res.makespan, "engine_start_max": max(starts), "engine_starts": len(starts),
            "rows_failed": res.status.rows_failed}


def run_baseline(model: Path, ps: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    script = tmp / "one_batch.py"
    script.write_text(ONE_BATCH)
    batches = [ps[i:i + args.batch_size] for i in range(0, len(ps), args.batch_size)]

    def job(i: int) -> dict[str, float]:
        spec, out = tmp / f"job{i}.json", tmp / f"job{i}.out.json"
        spec.write_text(json.dumps({"model": str(model), "engine": ENGINE, "prompts": batches[i],
                                    "sampling": {"temperature": 0, "max_tokens": args.max_tokens}}))
        subprocess.run([sys.executable, str(script), str(spec), str(time.time()), str(out)], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"  baseline batch {i + 1}/{len(batches)} done", file=sys.stderr, flush=True)
        return json.loads(out.read_text())

    t0 = time.monotonic()
    with ThreadPoolExecutor(args.workers) as pool:
        jobs = list(pool.map(job, range(len(batches))))
    return {"makespan": time.monotonic() - t0, "batches": len(batches),
            "engine_start_mean": sum(j["start"] for j in jobs) / len(jobs),
            "generate_total": sum(j["generate"] for j in jobs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--model", type=Path, default=TINY_MODEL)
    args = p.parse_args()
    ensure_model(args.model)
    ps = prompts(args.rows)
    with tempfile.TemporaryDirectory(prefix="pcm-bench-") as d:
        tmp = Path(d)
        print(f"PCM: {args.rows} rows, batch size {args.batch_size}, {args.workers} workers ...", file=sys.stderr)
        pcm = run_pcm(args.model, ps, args, tmp)
        print("reload-per-batch baseline ...", file=sys.stderr)
        base = run_baseline(args.model, ps, args, tmp)
    ideal = pcm["engine_start_max"] + base["generate_total"] / args.workers
    print(f"rows={args.rows} batch_size={args.batch_size} workers={args.workers} max_tokens={args.max_tokens}")
    print(f"PCM makespan:              {pcm['makespan']:8.1f} s  ({pcm['engine_starts']} engine starts,"
          f" slowest {pcm['engine_start_max']:.1f} s)")
    print(f"reload-per-batch makespan: {base['makespan']:8.1f} s  ({base['batches']} engine starts,"
          f" mean {base['engine_start_mean']:.1f} s; generation {base['generate_total']:.1f} s in all)")
    print(f"speed-up (baseline / PCM): {base['makespan'] / pcm['makespan']:8.2f} x")
    print(f"ideal (1 start/worker + generation/workers): {ideal:.1f} s")
    print(f"PCM / ideal:               {pcm['makespan'] / ideal:8.3f}")


if __name__ == "__main__":
    main()
