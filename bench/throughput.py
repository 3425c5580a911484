"""One PCM worker against raw vLLM on the same prompts: is the worker as fast as its engine?

  raw  ``LLM.generate`` with every prompt at once (vLLM's own offline path), timed around the
       call, in a process of its own, with the engine arguments PCM's engine uses
  PCM  an embedded service, one local glidein, the same engine settings; timed from the
       engine ready (the service's library event) to the last row's result (its rows table)

for each batch size, greedy with a fixed number of output tokens, so both sides produce the same
tokens; the texts must be equal row by row.

    python -m bench.throughput [--rows 2000] [--max-tokens 64] [--batch-sizes 10,100] [--repeat 3]

Prints both rates (output tokens/s and rows/s), the ratio PCM/raw, and whether the outputs match.
The speed of these shared machines drifts by up to ±20 % over minutes (raw alone, back to back:
9.9 to 12.3 s), so the cases run in ``--repeat`` rounds, each round raw and every batch size
back to back (their order rotated from round to round), and the summary gives the median of
the rounds' ratios: each ratio compares runs minutes apart at most.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.context_reuse import ENGINE, TINY_MODEL, ensure_model, prompts
from pcm_service.cli.embedded import run_workload
from pcm_service.protocol import ContextSpec, EngineSettings, RowIn, SamplingSettings, WorkloadSubmission

REPO = Path(__file__).resolve().parent.parent

RAW = r"""
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM
    from pcm_service.protocol import EngineSettings, SamplingSettings
    from worker_image.engines import VllmEngine
    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["model"], **VllmEngine.engine_args(EngineSettings(**job["engine"])))
    params = VllmEngine.sampling_params(SamplingSettings(**job["sampling"]), job["sampling"]["max_tokens"])
    t0 = time.perf_counter()
    outs = llm.generate(job["prompts"], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    json.dump({"seconds": seconds, "texts": [o.outputs[0].text for o in outs],
               "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}, open(sys.argv[2], "w"))
"""


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": 0, "max_tokens": args.max_tokens, "min_tokens": args.max_tokens}


def run_raw(model: Path, ps: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    script, job, out = tmp / "raw.py", tmp / "raw.json", tmp / "raw.out.json"
    script.write_text(RAW)
    job.write_text(json.dumps({"model": str(model), "engine": ENGINE, "prompts": ps, "sampling": sampling(args)}))
    subprocess.run([sys.executable, str(script), str(job), str(out)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dict(json.loads(out.read_text()))


def run_pcm(model: Path, ps: list[str], batch_size: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    output = tmp / f"pcm{batch_size}.jsonl"
    sub = WorkloadSubmission(
        name=f"throughput-{batch_size}", batch_size=batch_size, output=str(output),
        context=ContextSpec(model=str(model), engine=EngineSettings(**ENGINE)),
        sampling=SamplingSettings(**sampling(args)),
        rows=[RowIn(row_id=str(i), prompt=p) for i, p in enumerate(ps)])
    state = tmp / f"pcm{batch_size}"
    run_workload(sub, state, workers=1)
    db = sqlite3.connect(state / "service" / "pcm.sqlite3")
    ready = db.execute("SELECT MIN(at) FROM library_events WHERE state='ready'").fetchone()[0]
    last, tokens = db.execute("SELECT MAX(finished_at), SUM(completion_tokens) FROM rows").fetchone()
    db.close()
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    return {"seconds": last - ready, "tokens": tokens, "texts": [r["text"] for r in lines]}


def row(label: str, r: dict[str, Any], rows: int, raw: dict[str, Any]) -> str:
    rate, raw_rate = r["tokens"] / r["seconds"], raw["tokens"] / raw["seconds"]
    same = sum(a == c for a, c in zip(r["texts"], raw["texts"], strict=True))
    return (f"{label:22} {r['seconds']:8.2f} {rate:9.0f} {rows / r['seconds']:7.1f} {rate / raw_rate:7.3f}"
            f"  {'identical' if same == rows else f'{same}/{rows} equal'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="10,100")
    p.add_argument("--model", type=Path, default=TINY_MODEL)
    p.add_argument("--repeat", type=int, default=3, help="rounds of raw and every batch size, back to back")
    args = p.parse_args()
    ensure_model(args.model)
    ps = prompts(args.rows)
    cases: list[int] = [0, *(int(b) for b in args.batch_sizes.split(","))]  # 0: raw LLM.generate
    label = {b: "raw LLM.generate" if b == 0 else f"PCM batch size {b}" for b in cases}
    rounds: list[dict[int, dict[str, Any]]] = []
    print(f"rows={args.rows} max_tokens={args.max_tokens} model={args.model.name} (greedy, fixed length)")
    with tempfile.TemporaryDirectory(prefix="pcm-bench-throughput-") as d:
        for n in range(args.repeat):
            tmp = Path(d) / f"round{n}"
            tmp.mkdir()
            got: dict[int, dict[str, Any]] = {}
            for b in cases[n % len(cases):] + cases[:n % len(cases)]:  # rotated: no case always first
                print(f"round {n + 1}: {label[b]} ...", file=sys.stderr, flush=True)
                got[b] = run_raw(args.model, ps, args, tmp) if b == 0 else run_pcm(args.model, ps, b, args, tmp)
            rounds.append(got)
            print(f"round {n + 1}{'':16} {'seconds':>8} {'tokens/s':>9} {'rows/s':>7} {'vs raw':>7}  outputs")
            for b in cases:
                print(row(label[b], got[b], args.rows, got[0]), flush=True)
    print(f"median of {len(rounds)} rounds{'':7} {'tokens/s':>9} {'vs raw':>7}  outputs (rates: the median"
          " run's; ratio: the median of the rounds' ratios)")
    for b in cases:
        rates = [g[b]["tokens"] / g[b]["seconds"] for g in rounds]
        ratios = [rate / (g[0]["tokens"] / g[0]["seconds"]) for rate, g in zip(rates, rounds, strict=True)]
        same = all(g[b]["texts"] == rounds[0][0]["texts"] for g in rounds)
        print(f"{label[b]:22} {statistics.median(rates):9.0f} {statistics.median(ratios):7.3f}"
              f"  {'identical' if same else 'NOT identical'}")


if __name__ == "__main__":
    main()
