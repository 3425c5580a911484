"""TaskVine for the tests that need it: skipped with the reason where `make taskvine` has not
run, a failure under CI (PCM_REQUIRE_TASKVINE=1), like the HTCondor pool; and stopping a
vine_worker a test started itself, with all it forked."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

import psutil
import pytest


def require_taskvine() -> ModuleType:
    """``ndcctools.taskvine``, or skip the calling test module (call it at module level)."""
    try:
        import ndcctools.taskvine as vine
    except ImportError:
        if os.environ.get("PCM_REQUIRE_TASKVINE"):
            raise
        pytest.skip("TaskVine is not built: run `make taskvine` (or conda install -c conda-forge ndcctools)",
                    allow_module_level=True)
    return vine


def stop_vine_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a vine_worker and everything below it (its transfer server would outlive it,
    reparented to init, and each library runs in a process group of its own), and remove the
    workspace it makes when given no --workdir (TMPDIR/worker-UID-PID)."""
    try:
        top = psutil.Process(proc.pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=10)
    shutil.rmtree(Path(tempfile.gettempdir()) / f"worker-{os.getuid()}-{proc.pid}", ignore_errors=True)
