"""Makespan under preemption: one workload with no evictions and with the eviction drill
(SIGKILL of a random warm worker every X seconds), for two batch sizes.

    python -m bench.churn [--rows 2000] [--workers 2] [--every 20,40] [--batch-sizes 10,100]

Each run is `pcm run` in-process (embedded service, local factory, real vLLM CPU engines).
Prints each makespan, its ratio to the undisturbed run of the same batch size, the
evictions, the batches whose rows were in flight at a kill, and the engine starts (each
replacement pays the context again). The seed papers report that with the context retained
the run time is flat across batch sizes; the last lines say whether PCM's is.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from factory.drill import EvictionSettings
from pcm_service.cli.embedded import run_workload
from pcm_service.core import ServiceConfig
from pcm_service.protocol import ContextSpec, EngineSettings, RowIn, SamplingSettings, WorkloadSubmission

REPO = Path(__file__).resolve().parent.parent

ENGINE: dict[str, Any] = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
                          "kv_cache_memory_bytes": 256 * 2**20}


def prompts(n: int) -> list[str]:
    rows = [json.loads(x) for x in (REPO / "configs/workloads/claims.jsonl").read_text().splitlines()]
    return [f"Claim: {rows[i % len(rows)]['claim']} (#{i})\nVerdict:" for i in range(n)]


def one_run(model: Path, args: argparse.Namespace, batch_size: int, every: float | None,
            tmp: Path) -> dict[str, float]:
    tag = f"b{batch_size}-" + (f"e{every:g}" if every else "none")
    sub = WorkloadSubmission(
        name=f"churn-{tag}", batch_size=batch_size, output=str(tmp / f"{tag}.jsonl"),
        context=ContextSpec(model=str(model), engine=EngineSettings(**ENGINE)),
        sampling=SamplingSettings(temperature=0, max_tokens=args.max_tokens, min_tokens=args.max_tokens),
        rows=[RowIn(row_id=str(i), prompt=p) for i, p in enumerate(prompts(args.rows))])
    drill = EvictionSettings(interval=every, signal="kill", seed=args.seed) if every else None
    print(f"  run {tag} ...", file=sys.stderr, flush=True)
    res = run_workload(sub, tmp / tag, workers=args.workers, eviction=drill,
                       config=ServiceConfig(idle_timeout=30.0, heartbeat_interval=1.0))
    db = sqlite3.connect(tmp / tag / "service" / "pcm.sqlite3")
    lost = db.execute("SELECT COUNT(*) FROM workers WHERE state='lost'").fetchone()[0]
    hit = db.execute("SELECT COUNT(*) FROM batches WHERE losses>0").fetchone()[0]
    starts = db.execute("SELECT COUNT(*), AVG(seconds) FROM library_events WHERE state='ready'").fetchone()
    texts = [json.loads(x)["text"] for x in Path(sub.output).read_text().splitlines()]
    return {"makespan": res.makespan, "evictions": lost, "batches_hit": hit, "engine_starts": starts[0],
            "engine_start_s": starts[1] or 0.0, "rows_failed": res.status.rows_failed, "texts": texts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=128, help="every row generates exactly this many")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--every", default="20,40", help="eviction intervals in seconds, comma-separated")
    p.add_argument("--batch-sizes", default="10,100")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="where runs keep state (default: a temp dir)")
    args = p.parse_args()
    from pcm_service.cli.tinymodel import make_tiny_model

    tmp = args.work or Path(tempfile.mkdtemp(prefix="pcm-bench-churn-"))
    model = make_tiny_model(tmp / "tiny-llama")
    intervals = [float(x) for x in args.every.split(",") if x]
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    print(f"{args.rows} rows x {args.max_tokens} tokens, {args.workers} local workers, {os.cpu_count()} cores;"
          f" eviction drill: SIGKILL a random warm worker every X s (first X s after one is warm)", flush=True)
    results: dict[tuple[int, float | None], dict[str, float]] = {}
    for bs in sizes:
        for every in [None, *intervals]:
            results[(bs, every)] = one_run(model, args, bs, every, tmp)
    print(f"{'batch':>5} | {'evict every':>11} | {'makespan s':>10} | {'vs none':>7} | {'evictions':>9} |"
          f" {'batches hit':>11} | {'engine starts':>13} | failed | same text")
    for (bs, every), r in results.items():
        base = results[(bs, None)]
        same = "yes" if r["texts"] == base["texts"] else "NO"
        print(f"{bs:>5} | {('-' if every is None else f'{every:g} s'):>11} | {r['makespan']:>10.1f} |"
              f" {r['makespan'] / base['makespan']:>6.2f}x | {r['evictions']:>9} | {r['batches_hit']:>11} |"
              f" {r['engine_starts']:>5} ({r['engine_start_s']:.0f} s) | {r['rows_failed']:>6} | {same}")
    for every in [None, *intervals]:
        spans = [results[(bs, every)]["makespan"] for bs in sizes]
        label = "no evictions" if every is None else f"evictions every {every:g} s"
        print(f"{label}: makespan across batch sizes {sizes}: "
              + ", ".join(f"{s:.1f} s" for s in spans) + f" (max/min {max(spans) / min(spans):.2f}x)")


if __name__ == "__main__":  # vLLM spawns processes: this guard is required
    main()
