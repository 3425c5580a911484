"""No process a test session started may outlive it: the session marks its environment
(PCM_TEST_SESSION=<uuid>, inherited by every child, so an orphan reparented to init is still
known) and at its end fails, naming each process still marked or still below pytest.

Started deliberately and stopped before the end, as the HTCondor test pool is, a process is no
leak; the pool's daemons run with a cleared environment (testpool.sh: env -i) and are not
marked, so a pool kept between runs (PCM_KEEP_POOL=1) is not reported either."""
from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

SESSION_ENV = "PCM_TEST_SESSION"
GRACE = 10.0  # seconds for processes already on their way out (a stopped service, a glidein)


@dataclass(frozen=True)
class Proc:
    pid: int
    started: str  # start time (clock ticks since boot): a reused pid is another process
    cmdline: str


def _stat(pid: int) -> Optional[list[str]]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def mark_session() -> str:
    """Mark this process's environment (children inherit it): a new mark, even inside another
    marked session (a pytest run by a test), whose processes are not this session's."""
    os.environ[SESSION_ENV] = uuid.uuid4().hex
    return os.environ[SESSION_ENV]


def survivors(mark: str, root: int) -> list[Proc]:
    """Live processes other than ``root`` and its ancestors that carry ``mark`` or descend from ``root``."""
    stats = {int(e): f for e in os.listdir("/proc") if e.isdigit() and (f := _stat(int(e))) is not None}
    keep, pid = set(), root
    while pid > 0 and pid not in keep:
        keep.add(pid)
        pid = int(stats[pid][1]) if pid in stats else 0
    below, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for child in (p for p, f in stats.items() if int(f[1]) == parent and p not in below):
            below.add(child)
            todo.append(child)
    needle = f"{SESSION_ENV}={mark}".encode()
    found = []
    for pid, f in stats.items():
        if pid in keep or f[0] == "Z":
            continue
        try:
            marked = needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone, or not ours to read
        if marked or pid in below:
            found.append(Proc(pid, f[19], cmdline.strip() or f"[{pid}]"))
    return found


def still_running(procs: list[Proc]) -> list[Proc]:
    return [p for p in procs if (f := _stat(p.pid)) is not None and f[19] == p.started and f[0] != "Z"]


def leftovers(mark: str, root: int, grace: float = GRACE) -> list[Proc]:
    """What survives the session, after ``grace`` seconds for those on their way out."""
    deadline = time.monotonic() + grace
    while (found := survivors(mark, root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def kill(procs: list[Proc]) -> None:
    """Named, then stopped: a failed run leaves the machine as clean as a passing one."""
    for p in still_running(procs):
        try:
            os.kill(p.pid, signal.SIGKILL)
        except OSError:
            pass


# ----- the plugin (tests/conftest.py names it in pytest_plugins) -----------------------------
_SESSION: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    _SESSION.update(mark=mark_session(), root=os.getpid())


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down and other finishers ran
def pytest_sessionfinish(session: pytest.Session) -> None:
    if not os.path.isdir("/proc") or "mark" not in _SESSION:
        return
    found = leftovers(str(_SESSION["mark"]), int(str(_SESSION["root"])))
    if not found:
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    title = f"{len(found)} process(es) started by this session still running after it (now killed)"
    lines = [f"pid {p.pid}: {p.cmdline[:300]}" for p in found]
    if tr is not None:
        tr.write_sep("=", title, red=True)
        for line in lines:
            tr.write_line(line)
    else:
        print(title, *lines, sep="\n")
    kill(found)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
