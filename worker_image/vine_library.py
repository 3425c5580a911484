"""The functions of PCM's TaskVine Library: its context (the engine, started once per library
process) and one FunctionCall per leased batch.

TaskVine runs both inside the library process (``exec_mode="direct"``): ``load_engine`` once
when the library starts, then ``run_batch`` for each call, one at a time. A row the engine
rejects is that row's error result, and an engine that failed to start answers every call
with its error: an exception raised here would end the library, and the context with it.
The service pickles these functions by reference: the worker's Python must import PCM.

Answers are JSON text (the service decodes what a worker sends as data, never as code), and
the weights are checked against PCM's manifest (sha256 per chunk) before the engine starts:
a copy that differs (a poisoned peer transfer, a damaged cache) is refused, never loaded.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from pcm_service.protocol import BatchLease, ContextSpec, ModelManifest
from pcm_service.weights.chunks import build_manifest
from worker_image.engines import ENGINES, Completion
from worker_image.library import add_batch, row_result

MODEL_INPUT = "model"  # where the library task's sandbox holds the weights (a cached TaskVine input)
STATE: dict[str, Any] = {}  # this library process's context, and its own record of it


def short_ipc_dir() -> None:
    """TaskVine points TMPDIR into the task's sandbox, deeper than a unix socket path may be
    (108 bytes): vLLM's engine sockets go to a short directory instead."""
    if len(tempfile.gettempdir()) > 48 and "VLLM_RPC_BASE_PATH" not in os.environ:
        os.environ["VLLM_RPC_BASE_PATH"] = tempfile.mkdtemp(prefix="pcm-vine-", dir="/tmp")


class ModelRefused(Exception):
    """The library's copy of the weights is not the one PCM's manifest describes."""


def verified_model(root: str, manifest: ModelManifest) -> str:
    """Hash every file of ``manifest`` in ``root`` (the cached TaskVine input) and compare it
    chunk by chunk; return a directory of links to exactly those files (nothing else the copy
    may hold), for the engine. Raises ModelRefused naming the first file that differs."""
    files: dict[str, Path] = {}
    for f in manifest.files:
        rel = Path(f.path)
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelRefused(f"manifest path {f.path!r} is not inside the model")
        files[f.path] = Path(root, rel)
    try:
        got = {f.path: f for f in build_manifest(files, manifest.chunk_size).files}
    except OSError as e:
        raise ModelRefused(f"{e.filename}: {e.strerror}") from None
    for want in manifest.files:
        have = got[want.path]
        if have.size != want.size:
            raise ModelRefused(f"{want.path}: {have.size} bytes, the manifest says {want.size}")
        bad = next((i for i, (a, b) in enumerate(zip(want.chunks, have.chunks, strict=False)) if a != b), None)
        if bad is not None or len(want.chunks) != len(have.chunks):
            raise ModelRefused(f"{want.path}: chunk {bad} differs from PCM's manifest (sha256)")
    view = Path(tempfile.mkdtemp(prefix="verified-model-", dir=os.getcwd()))
    for rel_name, p in files.items():
        link = view / rel_name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(p.resolve())
    return str(view)


def load_engine(context_json: str, engine: str, manifest_json: str) -> None:
    spec = ContextSpec.model_validate_json(context_json)
    short_ipc_dir()
    STATE.update(pid=os.getpid(), host=socket.gethostname(), context_id=spec.context_id,
                 loads=STATE.get("loads", 0) + 1, error=None, refused=None)
    started = time.time()
    try:
        model = verified_model(os.path.abspath(MODEL_INPUT), ModelManifest.model_validate_json(manifest_json))
    except ModelRefused as e:  # never started on: the service drops the copies and fetches again
        STATE["refused"] = str(e)[:2000]
        STATE["error"] = f"model refused: {e}"[:2000]
        STATE["load_seconds"] = time.time() - started
        return
    log = os.path.abspath("engine.log")  # the engine's own processes say why they failed here
    with open(log, "ab") as fh:
        os.dup2(fh.fileno(), 2)
    try:
        STATE["engine"] = ENGINES[engine](spec.model_copy(update={"model": model}))
    except Exception as e:  # reported with every call; the service fails the context after a few
        with open(log, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log) - 1500))
            tail = fh.read().decode(errors="replace")
        STATE["error"] = f"{type(e).__name__}: {e}"[:2000] + f"\nengine log, last lines:\n{tail}"
    STATE["load_seconds"] = time.time() - started


def library_record() -> dict[str, Any]:
    """Which library process answered, and how often it loaded its engine (the context cost)."""
    return {k: STATE.get(k) for k in ("pid", "host", "context_id", "loads", "load_seconds", "error", "refused")}


def run_batch(lease_json: str) -> str:
    """Run every row of one leased batch; each row's result (or error) in ``results``, as JSON."""
    engine = STATE.get("engine")
    if engine is None:
        return json.dumps({"library": library_record(), "results": []})
    lease = BatchLease.model_validate_json(lease_json)
    done: list[Completion] = add_batch(engine, lease)
    while engine.has_unfinished():
        done += engine.step()
    return json.dumps({"library": library_record(),
                       "results": [row_result(c)[1].model_dump(mode="json") for c in done]})


def run_batch_cold(context_json: str, lease_json: str, engine: str, manifest_json: str) -> str:
    """A plain task without context: start an engine, run one batch, stop (the baseline)."""
    load_engine(context_json, engine, manifest_json)
    try:
        return run_batch(lease_json)
    finally:
        started = STATE.pop("engine", None)
        if started is not None:
            started.shutdown()
