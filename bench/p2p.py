"""K newcomers fetch one model: PCM's peer-to-peer replication vs origin only.

A real `pcm serve` is the origin, its upload rate limited; each newcomer is a real
seeder process (worker_image/seeder.py: the worker agent's cache, fetcher and blob
server, no engine) whose upload rate is limited the same way. All K start at once
on 127.0.0.1. For each K it prints the time until all K hold a verified copy, the
bytes the origin served, and both ratios; one run, no timed assertions.

    .venv/bin/python bench/p2p.py                      # ~1 GiB, 100 MB/s, K = 1,4,8,16
    .venv/bin/python bench/p2p.py --model-mib 256 --rate 25 --chunk-mib 16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from pcm_service.client import ServiceClient  # noqa: E402
from pcm_service.protocol import ModelManifest, ServiceStatus  # noqa: E402

TOKEN = "bench-pool-token"


def make_model(d: Path, mib: int, files: int) -> Path:
    """Random bytes in ``files`` shards plus a config.json (reused when already there)."""
    sizes = [mib * 2**20 // files] * files
    want = {f"model-{i + 1:05d}-of-{files:05d}.safetensors": s for i, s in enumerate(sizes)}
    if d.is_dir() and all((d / n).is_file() and (d / n).stat().st_size == s for n, s in want.items()):
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for name, size in want.items():
        with (d / name).open("wb") as fh:
            left = size
            while left:
                n = min(left, 64 * 2**20)
                fh.write(os.urandom(n))
                left -= n
    (d / "config.json").write_text('{"model_type": "bench"}')
    return d


def serve(state: Path, token_file: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pcm_service.cli", "serve", "--state-dir", str(state), "--port", str(port),
         "--pool-token-file", str(token_file), "--chunk-size", str(args.chunk_mib),
         "--origin-rate", str(args.rate), "--origin-slots", str(args.origin_slots),
         "--worker-timeout", "600"],
        stdout=(state.parent / "serve.log").open("ab"), stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    ServiceClient(url, retry_for=60).request("GET", "/healthz")
    return proc, url


def one_run(model: Path, k: int, p2p: bool, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    run_dir = tmp / f"{'p2p' if p2p else 'origin'}-{k}"
    run_dir.mkdir(parents=True)
    token_file = run_dir / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    (run_dir / "state").mkdir()
    service, url = serve(run_dir / "state", token_file, args)
    client = ServiceClient(url, token=TOKEN, timeout=600)
    seeders: list[subprocess.Popen] = []
    try:
        m = ModelManifest.model_validate(
            httpx.post(f"{url}/v1/models", json={"path": str(model)}, timeout=600).json())
        extra = (["--upload-rate", str(args.rate * 1e6), "--upload-slots", str(args.upload_slots)]
                 if p2p else ["--no-serve"])
        for i in range(k):
            seeders.append(subprocess.Popen(
                [sys.executable, "-m", "worker_image.seeder", "--service", url, "--model", m.digest,
                 "--work-dir", str(run_dir / f"w{i}"), "--token-file", str(token_file),
                 "--parallel", str(args.parallel), "--wait-go", "--hold", *extra],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO))
        for p in seeders:
            assert json.loads(p.stdout.readline())["event"] == "registered"
        t0 = time.time()
        for p in seeders:
            p.stdin.write("go\n")
            p.stdin.flush()
        done = []
        for p in seeders:
            ev = json.loads(p.stdout.readline())
            if ev["event"] != "complete":
                raise RuntimeError(f"a newcomer failed: {ev}")
            done.append(ev["at"])
            print(f"    {'p2p' if p2p else 'origin-only'} K={k}: {len(done)}/{k} at {ev['at'] - t0:.1f}s",
                  file=sys.stderr, flush=True)
        elapsed = max(done) - t0
        st = client.request("GET", "/status", None, ServiceStatus).transfers
        return {"seconds": elapsed, "origin_copies": st.origin_bytes / m.total_bytes,
                "peer_copies": st.peer_bytes / m.total_bytes, "failures": st.failures,
                "gib": m.total_bytes / 2**30, "chunk_mib": m.chunk_size / 2**20,
                "chunks": len(m.chunk_lengths)}
    finally:
        for p in seeders:
            if p.poll() is None:
                p.stdin.close()
        for p in seeders:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        service.terminate()
        service.wait(30)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=4, help="shards the model is split into")
    ap.add_argument("--rate", type=float, default=100.0, help="upload MB/s of the origin and of each peer")
    ap.add_argument("--sizes", default="1,4,8,16", help="numbers of newcomers")
    ap.add_argument("--chunk-mib", type=float, default=64, help="the service's largest chunk")
    ap.add_argument("--origin-slots", type=int, default=2)
    ap.add_argument("--upload-slots", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4, help="downloads at once per newcomer")
    ap.add_argument("--modes", default="p2p,origin")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "bench-p2p",
                    help="where the model and the newcomers' caches go")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / "model", args.model_mib, args.files)
    sizes = [int(x) for x in args.sizes.split(",")]
    modes = args.modes.split(",")
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for mode in modes:
            for k in sizes:
                results[mode, k] = one_run(model, k, mode == "p2p", args, Path(tmp))
    first = results[modes[0], sizes[0]]
    print(f"\nmodel {first['gib']:.2f} GiB in {args.files} files, {first['chunks']:.0f} chunks of "
          f"{first['chunk_mib']:g} MiB; upload limit {args.rate:g} MB/s for the origin and each peer; "
          f"origin slots {args.origin_slots}, peer slots {args.upload_slots}; {os.cpu_count()} cores")
    print(f"{'K':>3} | {'mode':<11} | {'all have it (s)':>15} | {'vs K=1':>6} | {'origin copies':>13} |"
          f" {'peer copies':>11} | failed")
    for mode in modes:
        base = results[mode, sizes[0]]["seconds"]
        for k in sizes:
            r = results[mode, k]
            print(f"{k:>3} | {mode:<11} | {r['seconds']:>15.1f} | {r['seconds'] / base:>5.2f}x |"
                  f" {r['origin_copies']:>13.2f} | {r['peer_copies']:>11.2f} | {r['failures']:.0f}")
    if "p2p" in modes and "origin" in modes:
        for k in sizes:
            print(f"K={k}: p2p is {results['origin', k]['seconds'] / results['p2p', k]['seconds']:.1f}x"
                  f" faster than origin-only")


if __name__ == "__main__":
    main()
