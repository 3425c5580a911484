"""K glideins that bring nothing start at once: their environment from the origin only vs peer to peer.

A real `pcm serve --worker-env` is the origin, its upload rate limited (--rate MB/s). Each
glidein is worker_image/bootstrap.py under the system's python3 with an empty environment and
an empty cache (its own work directory), which fetches the packed environment, verifies and
unpacks it, then execs a small program from it that registers a worker with the service.
"origin only": glideins do not pass chunks on (--upload-slots 0); "p2p": each serves the chunks
it has verified while it fetches. For K = 1, 4, 8 it prints the time until all K workers are
registered, the bytes the origin served, and the ratios; one run, no timed assertions.

    .venv/bin/python -m bench.env                 # the environment without the engine stack (~150 MiB)
    .venv/bin/python -m bench.env --rate 10 --ks 1,4
    .venv/bin/python -m bench.env --archive pcm-env.tar.gz   # an archive made by `pcm env pack`
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

from tests.support.serve import ServeProcess
from tests.support.state import db
from tests.test_env_bootstrap import LIGHT

REPO = Path(__file__).resolve().parent.parent

REGISTER = ("import os, socket; from pcm_service.client import ServiceClient;"
            " from pcm_service.protocol import WorkerRegistration;"
            " c = ServiceClient(os.environ['BENCH_SERVICE'], token=open(os.environ['BENCH_TOKEN']).read().strip());"
            " c.request('POST', '/workers', WorkerRegistration(host=socket.gethostname(), pid=os.getpid(),"
            " environment=os.environ['PCM_ENV_DIGEST']))")


def one_case(archive: Path, k: int, p2p: bool, rate: float, work: Path) -> tuple[float, int, int]:
    """(seconds until all K registered, origin bytes, peer bytes)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    serve = ServeProcess(work / "state", "--worker-env", str(archive), "--origin-rate", str(rate),
                         "--chunk-size", "4", model_roots=[]).start()
    try:
        env = {"PATH": "/usr/bin:/bin", "BENCH_SERVICE": serve.url, "BENCH_TOKEN": str(serve.pool_token_file)}
        t0 = time.monotonic()
        procs = []
        for i in range(k):
            node = work / f"node{i}"
            node.mkdir()
            procs.append(subprocess.Popen(
                ["/usr/bin/python3", str(REPO / "worker_image" / "bootstrap.py"), "--service", serve.url,
                 "--token-file", str(serve.pool_token_file), "--work-dir", str(node / "pcm-worker"),
                 "--upload-slots", "2" if p2p else "0", "--", "-c", REGISTER],
                cwd=node, env={**env, "HOME": str(node)}, stdout=subprocess.DEVNULL,
                stderr=(node / "bootstrap.log").open("wb")))
        for i, p in enumerate(procs):
            if p.wait(3600) != 0:
                raise SystemExit(f"glidein {i} failed: {(work / f'node{i}' / 'bootstrap.log').read_text()[-2000:]}")
        took = time.monotonic() - t0
        with closing(db(serve.state_dir)) as conn:
            registered = conn.execute("SELECT COUNT(*) FROM workers WHERE environment IS NOT NULL").fetchone()[0]
            origin, peer = conn.execute("SELECT SUM(CASE WHEN source='origin' THEN bytes ELSE 0 END),"
                                      " SUM(CASE WHEN source!='origin' THEN bytes ELSE 0 END)"
                                      " FROM transfers WHERE ok=1").fetchone()
        assert registered == k, f"{registered} of {k} workers registered"
        return took, origin or 0, peer or 0
    finally:
        serve.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, help="a packed environment (default: pack one without the engine)")
    ap.add_argument("--rate", type=float, default=20.0, help="the origin's upload MB/s")
    ap.add_argument("--ks", default="1,4,8")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pcm-bench-env-"))
    archive = args.archive
    if archive is None:
        archive = tmp / "pcm-env.tar.gz"
        subprocess.run([sys.executable, "-m", "pcm_service.cli", "env", "pack", "-o", str(archive),
                        *[a for p in LIGHT for a in ("--exclude", p)]], check=True)
    mib = archive.stat().st_size / 2**20
    print(f"environment: {archive.name}, {mib:.0f} MiB; origin upload {args.rate:g} MB/s;"
          " glideins bootstrap with /usr/bin/python3")
    print(f"{'K':>3} {'mode':<12} {'all registered s':>17} {'origin MiB':>11} {'peer MiB':>9} {'origin copies':>14}")
    results: dict[tuple[int, bool], tuple[float, int, int]] = {}
    for k in (int(x) for x in args.ks.split(",")):
        for p2p in (False, True):
            took, origin, peer = one_case(archive, k, p2p, args.rate, tmp / "case")
            results[(k, p2p)] = (took, origin, peer)
            print(f"{k:>3} {'p2p' if p2p else 'origin only':<12} {took:>17.1f} {origin / 2**20:>11.0f}"
                  f" {peer / 2**20:>9.0f} {origin / 2**20 / mib:>14.2f}", flush=True)
    for k in sorted({k for k, _ in results}):
        (t_o, b_o, _), (t_p, b_p, _) = results[(k, False)], results[(k, True)]
        print(f"K={k}: time origin-only/p2p = {t_o / t_p:.2f}x; origin bytes origin-only/p2p ="
              f" {b_o / max(b_p, 1):.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
