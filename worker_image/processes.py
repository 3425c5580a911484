"""The Linux calls (prctl) that keep a glidein's processes findable and take them along, and
the sweep that stops what its worker left (pcm_service/procfs.py reads them from /proc)."""
from __future__ import annotations

import ctypes
import os
import signal
import time

from pcm_service.procfs import kill_all, process_tree, running

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, arg: int) -> bool:
    """Linux's prctl(2); False where there is none (another OS) or it refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Orphans of this process's descendants become its children, not init's: a worker killed
    alone leaves its children (vine_worker's libraries, an agent's engine) where the glidein
    can still find and stop them."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """This process gets ``sig`` when its parent dies (a fork's child: call it in the child)."""
    _prctl(PR_SET_PDEATHSIG, sig)


def reap() -> None:
    """Collect the exit status of every child that has ended (a subreaper's orphans)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_descendants(timeout: float = 10.0) -> list[tuple[int, str]]:
    """SIGKILL every process below this one until none is left (one may fork while the others
    are killed); returns those it found. A subreaper also reaps them."""
    found: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout
    while (procs := [p for p in process_tree(os.getpid()) if running(p)]) and time.monotonic() < deadline:
        found += [p for p in procs if p not in found]
        kill_all(procs)
        reap()
        time.sleep(0.05)
    reap()
    return found
