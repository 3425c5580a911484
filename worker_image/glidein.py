"""What a glidein runs (`pcm worker`, from entry.sh or the local backend): the one place that
chooses PCM's agent or a ``vine_worker`` (the service says which executor it runs), and the
glidein's supervisor, which outlives its worker so that a glidein that goes leaves nothing.

The supervisor is a child subreaper: whatever its worker forks stays below it even when the
worker dies first (vine_worker puts each library in a process group of its own, so a kill of
the glidein's group misses them). It passes SIGTERM/SIGINT on (the worker drains) and, once
the worker has ended however it ended (exit, SIGTERM, SIGKILL), kills every process still
below it and removes its scratch: its own temporary directory (the library sockets, the work
directory when none was given) and vine_worker's workspace. The worker dies with it
(PR_SET_PDEATHSIG), so a supervisor killed alone takes its worker along; what the worker
forked is then the batch system's to stop (the local backend finds it by PCM_GLIDEIN_ID,
HTCondor by its process family)."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any, Callable, NoReturn, Optional

from pcm_service.client import ServiceClient, ServiceError
from pcm_service.procfs import GLIDEIN_ENV, glidein_tmp_prefix
from pcm_service.protocol import API_PREFIX, EXECUTOR_PATH, ExecutorInfo, ExecutorKind
from worker_image.processes import become_subreaper, die_with_parent, kill_descendants
from worker_image.vine_worker import remove_workspace, start_vine_worker

log = logging.getLogger("pcm.worker")
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal that ended it."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Supervisor:
    """Forwards the signals meant for the worker, waits for it, then clears up after it."""

    def __init__(self) -> None:
        self.pid = 0  # the worker, once started
        self.pending: list[int] = []  # signals that came before it started
        for sig in FORWARDED:
            signal.signal(sig, self._forward)

    def _forward(self, sig: int, _frame: Optional[FrameType]) -> None:
        if self.pid:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass  # already ended: the wait returns
        else:
            self.pending.append(sig)

    def started(self, pid: int) -> None:
        self.pid = pid
        for sig in self.pending:
            os.kill(pid, sig)

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)  # retried after each forwarded signal (PEP 475)
        return exit_code(status)


def _agent_child(parent: int, run: Callable[[], int]) -> NoReturn:
    """The forked agent: dies with the supervisor, never returns into the CLI."""
    rc = 1
    try:
        die_with_parent()
        if os.getppid() == parent:  # else the supervisor died before the line above
            rc = run()
    except ServiceError as e:
        log.error("the agent stops: %s", e.detail)
        rc = 2 if e.status in (401, 403) else 1
    except BaseException:
        log.exception("the agent failed")
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def run_agent(service_url: str, token: Optional[str], ca_file: Optional[Path], glidein_id: Optional[str],
              work: Path, tmp: Optional[Path], **kwargs: Any) -> int:
    """PCM's agent until it retires, is told to go (SIGTERM drains it) or loses the service."""
    from worker_image.agent import WorkerAgent  # the agent's imports only where it runs

    client = ServiceClient(service_url, retry_for=300.0, token=token, ca_file=ca_file)  # rides out a restart
    agent = WorkerAgent(client, token=token, glidein_id=glidein_id, work_dir=work, lib_dir=tmp, **kwargs)
    for sig in FORWARDED:
        signal.signal(sig, agent.request_drain)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # blocked since the fork: now they drain it
    return agent.run()


def executor_info(service_url: str, token: Optional[str], ca_file: Optional[Path]) -> ExecutorInfo:
    """What the service runs: asked first, so a refused pool token ends the glidein here."""
    client = ServiceClient(service_url, retry_for=300.0, token=token, ca_file=ca_file)  # rides out a restart
    try:
        return client.request("GET", EXECUTOR_PATH.removeprefix(API_PREFIX), response=ExecutorInfo)
    finally:
        client.close()


def run_glidein(service_url: str, token: Optional[str] = None, ca_file: Optional[Path] = None,
                glidein_id: Optional[str] = None, work_dir: Optional[Path] = None, **kwargs: Any) -> int:
    """An agent, or a vine_worker when the service's executor is TaskVine; its exit status."""
    info = executor_info(service_url, token, ca_file)
    glidein_id = glidein_id or os.environ.get(GLIDEIN_ENV)
    become_subreaper()
    sup = Supervisor()
    vine = info.kind == ExecutorKind.TASKVINE and token is not None
    # the glidein's own temporary directory (short: the agent's library sockets go here), and
    # the work directory when none was given
    tmp = Path(tempfile.mkdtemp(prefix=glidein_tmp_prefix(glidein_id))) if not (vine and work_dir) else None
    work = Path(work_dir) if work_dir else Path(str(tmp)) / "work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        if vine:
            assert token is not None
            child = start_vine_worker(service_url, info, token, glidein_id, work, preexec=die_with_parent)
            if child is None:
                return 2
            sup.started(child.pid)
            rc = child.wait()
            return 128 - rc if rc < 0 else rc
        parent = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # none is lost while the child sets up
        pid = os.fork()
        if pid == 0:
            _agent_child(parent, lambda: run_agent(service_url, token, ca_file, glidein_id, work, tmp, **kwargs))
        sup.started(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        return sup.wait()
    finally:
        left = kill_descendants()
        if left:
            log.info("glidein %s: stopped %d processes its worker left", glidein_id or "-", len(left))
        if vine:
            remove_workspace(work)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
