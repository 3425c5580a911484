"""Processes read from /proc, shared by the factory's local backend and the glidein: a
process is (pid, start time), so a pid the kernel hands out again is not taken for it; a
glidein's processes are known by the GLIDEIN_ENV each inherits, even after their parents died."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterable, Optional

GLIDEIN_ENV = "PCM_GLIDEIN_ID"  # set by the factory (or entry.sh) and inherited by every process of a glidein


def glidein_tmp_prefix(glidein_id: Optional[str]) -> str:
    """A glidein's temporary directory is named after it: where its supervisor was killed too,
    the backend that started it finds and removes it."""
    return f"pcm-glidein-{''.join(c if c.isalnum() or c in '._-' else '_' for c in glidein_id or '')}-"


def stat_fields(pid: int) -> Optional[list[str]]:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None
    where the process is gone or not ours to see."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[tuple[int, str]]:
    """Every process below ``pid``, each with its start time (so a pid the kernel hands out
    again later is not taken for it); where there is no /proc, none are known."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and (f := stat_fields(int(entry))) is not None:
            children.setdefault(int(f[1]), []).append((int(entry), f[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def running(proc: tuple[int, str]) -> bool:
    """The same process (pid and start time) still exists and is not a zombie."""
    f = stat_fields(proc[0])
    return f is not None and f[19] == proc[1] and f[0] != "Z"


def kill_all(procs: Iterable[tuple[int, str]]) -> None:
    for proc in procs:
        if running(proc):
            try:
                os.kill(proc[0], signal.SIGKILL)
            except OSError:
                continue  # gone meanwhile, or not ours to kill


def marked(name: str, value: str) -> list[tuple[int, str]]:
    """Every process of this user whose environment holds ``name=value`` (how a glidein's
    processes are known after their parents died: each inherits its GLIDEIN_ENV), each with
    its start time; none where there is no /proc."""
    mark = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue  # gone, or another user's
        if mark in environ.split(b"\0") and (f := stat_fields(int(entry))) is not None and f[0] != "Z":
            found.append((int(entry), f[19]))
    return found
