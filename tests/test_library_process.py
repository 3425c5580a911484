"""The library process and the engine processes vLLM starts under it: none outlives the worker.

vLLM's engine core notices its parent's death once it runs, but not while it starts: a library
killed during the engine's start (a glidein evicted or removed while loading, the agent's start
timeout) left the engine core and its model worker running, orphaned, holding the model.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pcm_service.procfs import process_tree, running
from pcm_service.protocol import ContextSpec, EngineSettings
from tests.support.models import ENGINE
from tests.support.waiting import wait_for
from worker_image.library_handle import LibraryFailed, LibraryHandle

pytestmark = pytest.mark.engine


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_a_library_killed_while_its_engine_starts_takes_the_engine_processes_with_it(
        tiny_model: Path, tmp_path: Path) -> None:
    lib = LibraryHandle(ContextSpec(model=str(tiny_model), engine=EngineSettings(**ENGINE)), tmp_path)
    # the engine core has started its model worker, which is loading: the engine is not ready yet
    def engine_procs() -> list[tuple[int, str]]:
        tree = process_tree(lib.proc.pid)
        return tree if any(_comm(pid).startswith("VLLM::Worker") for pid, _ in tree) else []

    procs = wait_for(engine_procs, 300, "vLLM's model worker to start", every=0.05)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(LibraryFailed, match="cancelled"):
        lib.wait_ready(600, cancelled)  # what the agent does when it is evicted while loading
    lib.stop(grace=0)
    assert lib.proc.returncode is not None and lib.proc.returncode < 0, "the library was killed"
    # SIGKILL is delivered asynchronously; an orphan that survives stays running for good
    wait_for(lambda: not any(running(p) for p in procs), 60, "the engine's processes to be gone", every=0.1)
