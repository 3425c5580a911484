"""What a glidein's processes left behind, read from /proc: vLLM's engine core and model
workers under a library, vine_worker's transfer server and libraries under the glidein."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


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
