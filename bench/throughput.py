"""One PCM worker against raw vLLM on the same prompts: is the worker as fast as its engine?

  raw  ``LLM.generate`` with every prompt at once (vLLM's own offline path), timed around the
       call, in a process of its own, with the engine arguments PCM's engine uses
  PCM  an embedded service, one local glidein, the same engine settings; timed from the
       engine ready (the service's library event) to the last row's result (its rows table)

for each batch size, greedy with a fixed number of output tokens, so both sides produce the same
tokens; the texts must be equal row by row.

    python bench/throughput.py [--rows 2000] [--max-tokens 64] [--batch-sizes 10,100]

Prints both rates (output tokens/s and rows/s), the ratio PCM/raw, and whether the outputs match.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.context_reuse import ENGINE, TINY_MODEL, ensure_model, prompts  # noqa: E402
from pcm_service.cli.embedded import run_workload  # noqa: E402
from pcm_service.protocol import ContextSpec, EngineSettings, RowIn, SamplingSettings, WorkloadSubmission  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="10,100")
    p.add_argument("--model", type=Path, default=TINY_MODEL)
    args = p.parse_args()
    ensure_model(args.model)
    ps = prompts(args.rows)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="pcm-bench-throughput-") as d:
        tmp = Path(d)
        print(f"raw LLM.generate: {args.rows} rows ...", file=sys.stderr, flush=True)
        raw = run_raw(args.model, ps, args, tmp)
        pcm = {}
        for b in sizes:
            print(f"PCM, one worker, batch size {b} ...", file=sys.stderr, flush=True)
            pcm[b] = run_pcm(args.model, ps, b, args, tmp)
    raw_rate = raw["tokens"] / raw["seconds"]
    print(f"rows={args.rows} max_tokens={args.max_tokens} model={args.model.name} (greedy, fixed length)")
    print(f"{'':22} {'seconds':>8} {'tokens/s':>9} {'rows/s':>7} {'vs raw':>7}  outputs")
    print(f"{'raw LLM.generate':22} {raw['seconds']:8.2f} {raw_rate:9.0f} {args.rows / raw['seconds']:7.1f}"
          f" {1:7.3f}")
    for b, r in pcm.items():
        rate = r["tokens"] / r["seconds"]
        same = sum(a == c for a, c in zip(r["texts"], raw["texts"], strict=True))
        print(f"{f'PCM batch size {b}':22} {r['seconds']:8.2f} {rate:9.0f} {args.rows / r['seconds']:7.1f}"
              f" {rate / raw_rate:7.3f}  {'identical' if same == args.rows else f'{same}/{args.rows} equal'}")


if __name__ == "__main__":
    main()
