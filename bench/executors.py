"""The same workload on three executors, side by side in one run:

  (a) TaskVine, a plain task per batch that starts its own engine (the seed papers' baseline
      without context: `--executor taskvine` with no Library)
  (b) TaskVine with PCM's context Library (`--executor taskvine`): the engine starts once per
      library process, each batch a FunctionCall
  (c) PCM's native workers (`--executor native`)

each with an embedded service, a local factory and ``--workers`` glideins on this machine,
for each batch size. (a) pays an engine start per batch: keep --rows such that it ends.

    python -m bench.executors [--rows 400] [--max-tokens 32] [--batch-sizes 10,100] [--workers 2]

Prints, from the service's own records: makespan, engine starts, time to first row, rows/s
from the first engine ready to the last row, and the ratios.
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.context_reuse import ENGINE, TINY_MODEL, ensure_model, prompts
from pcm_service.cli.embedded import run_workload
from pcm_service.protocol import (
    ContextSpec,
    EngineSettings,
    ExecutorKind,
    RowIn,
    SamplingSettings,
    WorkloadSubmission,
)

MODES = {"a": ("TaskVine, task per batch", ExecutorKind.TASKVINE, False),
         "b": ("TaskVine, context Library", ExecutorKind.TASKVINE, True),
         "c": ("PCM native workers", ExecutorKind.NATIVE, True)}


def run_mode(mode: str, model: Path, ps: list[str], batch_size: int, args: argparse.Namespace,
             tmp: Path) -> dict[str, Any]:
    _, executor, library = MODES[mode]
    sub = WorkloadSubmission(
        name=f"bench-{mode}-{batch_size}", batch_size=batch_size, output=str(tmp / f"{mode}{batch_size}.jsonl"),
        context=ContextSpec(model=str(model), engine=EngineSettings(**ENGINE)),
        sampling=SamplingSettings(temperature=0, max_tokens=args.max_tokens, min_tokens=args.max_tokens),
        rows=[RowIn(row_id=str(i), prompt=p) for i, p in enumerate(ps)])
    state = tmp / f"{mode}{batch_size}"
    res = run_workload(sub, state, workers=args.workers, executor=executor, context_library=library)
    db = sqlite3.connect(state / "service" / "pcm.sqlite3")
    created = db.execute("SELECT created_at FROM workloads").fetchone()[0]
    first_ready = db.execute("SELECT MIN(at) FROM library_events WHERE state='ready'").fetchone()[0]
    starts = db.execute("SELECT COUNT(*) FROM library_events WHERE state='ready'").fetchone()[0]
    first_row, last_row, failed = db.execute(
        "SELECT MIN(finished_at), MAX(finished_at), SUM(error IS NOT NULL) FROM rows").fetchone()
    db.close()
    ready_span = max(last_row - first_ready, 1e-6) if first_ready else float("nan")
    return {"makespan": res.makespan, "starts": starts, "first_row": first_row - created,
            "rows_per_s": len(ps) / ready_span, "failed": failed or 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="10,100")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--modes", default="abc", help="which of a, b, c to run")
    p.add_argument("--model", type=Path, default=TINY_MODEL)
    args = p.parse_args()
    ensure_model(args.model)
    ps = prompts(args.rows)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pcm-bench-executors-") as d:
        for b in sizes:
            for mode in args.modes:
                print(f"({mode}) {MODES[mode][0]}: {args.rows} rows, batch size {b}, {args.workers} workers ...",
                      file=sys.stderr, flush=True)
                results[mode, b] = r = run_mode(mode, args.model, ps, b, args, Path(d))
                print(f"    {r}", file=sys.stderr, flush=True)
    print(f"rows={args.rows} max_tokens={args.max_tokens} workers={args.workers} model={args.model.name}")
    print(f"{'executor':28} {'batch':>5} {'makespan s':>10} {'starts':>6} {'1st row s':>9} {'rows/s ready':>12}")
    for (mode, b), r in results.items():
        print(f"({mode}) {MODES[mode][0]:24} {b:5d} {r['makespan']:10.1f} {r['starts']:6d} {r['first_row']:9.1f}"
              f" {r['rows_per_s']:12.1f}" + (f"  ({r['failed']} rows failed)" if r["failed"] else ""))
    for b in sizes:
        got = {m: results[m, b]["makespan"] for m in args.modes}
        if "a" in got and "b" in got:
            print(f"batch {b}: makespan (a)/(b) = {got['a'] / got['b']:.2f}x", end="")
        if "b" in got and "c" in got:
            print(f"; (b)/(c) = {got['b'] / got['c']:.2f}x", end="")
        print()
    for m in args.modes:
        if all((m, b) in results for b in sizes) and len(sizes) > 1:
            spans = [results[m, b]["makespan"] for b in sizes]
            print(f"({m}) makespan batch {sizes[0]} / batch {sizes[-1]}: {spans[0] / spans[-1]:.2f}")


if __name__ == "__main__":
    main()
