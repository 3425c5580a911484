"""A worker that fetches one model and serves it to peers, without an engine.

It seeds a pool ahead of a wave of glideins, and it is how ``bench/p2p.py`` and
the tests run many newcomers at once without starting engines. One JSON line
per event goes to stdout: registered, complete (or failed).

    python -m worker_image.seeder --service URL --model MANIFEST_DIGEST [--hold]
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pcm_service.client import ServiceClient, ServiceError
from pcm_service.protocol import ContextState
from pcm_service.tokens import read_token
from worker_image.agent import PeerSettings, WorkerAgent
from worker_image.fetcher import FetchFailed


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "at": time.time(), **fields}), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker_image.seeder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--service", required=True)
    ap.add_argument("--model", required=True, help="the model's manifest digest")
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--token-file", type=Path)
    ap.add_argument("--ca-file", type=Path, help="what to trust for an https:// service")
    ap.add_argument("--blob-port", type=int, default=0, help="blob server port (0: any free one)")
    ap.add_argument("--blob-url", help="the URL peers use for this blob server (NAT, forwarding)")
    ap.add_argument("--upload-rate", type=float, default=0.0, help="bytes/s, 0: unlimited")
    ap.add_argument("--upload-slots", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4, help="downloads at once")
    ap.add_argument("--no-serve", action="store_true", help="do not serve chunks to peers")
    ap.add_argument("--wait-go", action="store_true", help="read one line from stdin before fetching")
    ap.add_argument("--hold", action="store_true", help="keep serving until stdin closes or SIGTERM")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    token = read_token(args.token_file) if args.token_file else None
    client = ServiceClient(args.service, retry_for=30.0, token=token, ca_file=args.ca_file)
    agent = WorkerAgent(client, work_dir=args.work_dir, token=token, peers=PeerSettings(
        serve=not args.no_serve, port=args.blob_port, url=args.blob_url, upload_rate=args.upload_rate,
        upload_slots=args.upload_slots, fetch_parallel=args.parallel))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent.join()
    emit("registered", worker_id=agent.worker_id, blob_url=agent.blobs.url if agent.blobs else None)
    if args.wait_go:
        sys.stdin.readline()
    rc = 0
    t0 = time.monotonic()
    agent.context_state = ContextState.FETCHING
    try:
        model_dir = agent.fetcher.fetch(args.model, stop)
        agent.context_state = ContextState.CACHED
        emit("complete", worker_id=agent.worker_id, seconds=time.monotonic() - t0, dir=str(model_dir))
    except (FetchFailed, ServiceError) as e:
        emit("failed", worker_id=agent.worker_id, error=str(e))
        rc = 1
    if args.hold and rc == 0:
        def hold() -> None:  # until stdin closes
            sys.stdin.read()
            stop.set()

        threading.Thread(target=hold, daemon=True).start()
        stop.wait()
    agent.leave()
    if agent.blobs is not None:
        emit("served", worker_id=agent.worker_id, bytes=agent.blobs.bytes_served)
    return rc


if __name__ == "__main__":
    sys.exit(main())
