"""The library process: loads the engine once (the context) and runs batch after batch.

It talks to its worker agent over a ``multiprocessing.connection`` socket:
agent → library: ("batch", BatchLease-json) | ("shutdown",)
library → agent: ("ready", seconds, capacity) | ("failed", error) | ("rows", {batch_id: RowResult-list-json})
(one "rows" message per engine step, whatever the number of batches it finished rows of)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections import defaultdict
from multiprocessing.connection import Client, Connection

from pydantic import TypeAdapter

from pcm_service.protocol import BatchLease, ContextSpec, RowResult
from worker_image.engines import ENGINES, Completion, Engine

AUTHKEY_ENV = "PCM_LIBRARY_AUTHKEY"
ROW_RESULTS = TypeAdapter(list[RowResult])


def _request_id(batch_id: int, idx: int) -> str:
    return f"{batch_id}:{idx}"


def _split(request_id: str) -> tuple[int, int]:
    b, i = request_id.split(":")
    return int(b), int(i)


def row_result(c: Completion) -> tuple[int, RowResult]:
    """The batch a completion belongs to, and its row's result."""
    batch_id, idx = _split(c.request_id)
    return batch_id, RowResult(idx=idx, text=c.text, finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
                               completion_tokens=c.completion_tokens, error=c.error, choices=c.choices)


def _send_completions(conn: Connection, done: list[Completion]) -> None:
    by_batch: dict[int, list[RowResult]] = defaultdict(list)
    for c in done:
        batch_id, result = row_result(c)
        by_batch[batch_id].append(result)
    conn.send(("rows", {b: ROW_RESULTS.dump_json(rows) for b, rows in by_batch.items()}))


def add_batch(engine: Engine, lease: BatchLease) -> list[Completion]:
    """Queue every row; a row the engine rejects becomes an error result at once."""
    rejected = []
    for row in lease.rows:
        rid = _request_id(lease.batch_id, row.idx)
        try:
            engine.add_request(rid, row.prompt, row.messages, row.sampling or lease.sampling)
        except Exception as e:  # the engine refused this row only; keep the context alive
            rejected.append(Completion(request_id=rid, text=None, finish_reason=None,
                                       prompt_tokens=0, completion_tokens=0,
                                       error=f"{type(e).__name__}: {e}"))
    return rejected


def serve(conn: Connection, engine: Engine) -> None:
    while True:
        block = not engine.has_unfinished()
        while conn.poll(None if block else 0):
            block = False
            msg = conn.recv()
            if msg[0] == "shutdown":
                return
            if msg[0] == "batch":
                rejected = add_batch(engine, BatchLease.model_validate_json(msg[1]))
                if rejected:
                    _send_completions(conn, rejected)
        if engine.has_unfinished():
            done = engine.step()
            if done:
                _send_completions(conn, done)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="PCM library process (started by the worker agent)")
    p.add_argument("--address", required=True)
    p.add_argument("--context-file", required=True)
    p.add_argument("--engine", default="vllm", choices=sorted(ENGINES))
    p.add_argument("--spawned-at", type=float, default=time.time())
    args = p.parse_args(argv)
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
    conn = Client(args.address, authkey=authkey)
    with open(args.context_file, encoding="utf-8") as fh:
        context = ContextSpec.model_validate_json(fh.read())
    try:
        engine = ENGINES[args.engine](context)
    except Exception as e:
        traceback.print_exc()
        conn.send(("failed", f"{type(e).__name__}: {e}"[:4000]))
        return 1
    conn.send(("ready", time.time() - args.spawned_at, engine.capacity))
    try:
        serve(conn, engine)
    except (EOFError, ConnectionError, BrokenPipeError):
        pass  # the agent is gone; nothing left to do
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":  # vLLM spawns processes: this guard is required
    sys.exit(main())
