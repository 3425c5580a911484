"""The functions of PCM's TaskVine Library: its context (the engine, started once per library
process) and one FunctionCall per leased batch.

TaskVine runs both inside the library process (``exec_mode="direct"``): ``load_engine`` once
when the library starts, then ``run_batch`` for each call, one at a time. A row the engine
rejects is that row's error result, and an engine that failed to start answers every call
with its error: an exception raised here would end the library, and the context with it.
The service pickles these functions by reference: the worker's Python must import PCM.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from typing import Any

from pcm_service.protocol import BatchLease, ContextSpec
from worker_image.engines import ENGINES, Completion
from worker_image.library import add_batch, row_result

MODEL_INPUT = "model"  # where the library task's sandbox holds the weights (a cached TaskVine input)
STATE: dict[str, Any] = {}  # this library process's context, and its own record of it


def short_ipc_dir() -> None:
    """TaskVine points TMPDIR into the task's sandbox, deeper than a unix socket path may be
    (108 bytes): vLLM's engine sockets go to a short directory instead."""
    if len(tempfile.gettempdir()) > 48 and "VLLM_RPC_BASE_PATH" not in os.environ:
        os.environ["VLLM_RPC_BASE_PATH"] = tempfile.mkdtemp(prefix="pcm-vine-", dir="/tmp")


def load_engine(context_json: str, engine: str = "vllm") -> None:
    spec = ContextSpec.model_validate_json(context_json)
    short_ipc_dir()
    STATE.update(pid=os.getpid(), host=socket.gethostname(), context_id=spec.context_id,
                 loads=STATE.get("loads", 0) + 1, error=None)
    started = time.time()
    log = os.path.abspath("engine.log")  # the engine's own processes say why they failed here
    with open(log, "ab") as fh:
        os.dup2(fh.fileno(), 2)
    try:
        STATE["engine"] = ENGINES[engine](spec.model_copy(update={"model": os.path.abspath(MODEL_INPUT)}))
    except Exception as e:  # reported with every call; the service fails the context after a few
        with open(log, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log) - 1500))
            tail = fh.read().decode(errors="replace")
        STATE["error"] = f"{type(e).__name__}: {e}"[:2000] + f"\nengine log, last lines:\n{tail}"
    STATE["load_seconds"] = time.time() - started


def library_record() -> dict[str, Any]:
    """Which library process answered, and how often it loaded its engine (the context cost)."""
    return {k: STATE.get(k) for k in ("pid", "host", "context_id", "loads", "load_seconds", "error")}


def run_batch(lease_json: str) -> dict[str, Any]:
    """Run every row of one leased batch; each row's result (or error) in ``results``."""
    engine = STATE.get("engine")
    if engine is None:
        return {"library": library_record(), "results": []}
    lease = BatchLease.model_validate_json(lease_json)
    done: list[Completion] = add_batch(engine, lease)
    while engine.has_unfinished():
        done += engine.step()
    return {"library": library_record(),
            "results": [row_result(c)[1].model_dump(mode="json") for c in done]}


def run_batch_cold(context_json: str, lease_json: str, engine: str = "vllm") -> dict[str, Any]:
    """A plain task without context: start an engine, run one batch, stop (the baseline)."""
    load_engine(context_json, engine)
    try:
        return run_batch(lease_json)
    finally:
        started = STATE.pop("engine", None)
        if started is not None:
            started.shutdown()
