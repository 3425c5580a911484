"""Glideins as local subprocesses: the embedded default for `pcm run` and tests.

A glidein that goes leaves nothing: once its process has ended (exit, removal, eviction),
every process still marked with its GLIDEIN_ENV is killed (vine_worker's libraries run in
process groups of their own, so a killpg alone misses them), its directory is emptied but for
worker.log, and its temporary directory (named after it) is removed."""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from factory.backends.base import Glidein, GlideinBackend, GlideinState
from factory.config import FactoryConfig
from pcm_service.procfs import GLIDEIN_ENV, glidein_tmp_prefix, kill_all, marked
from pcm_service.tokens import SECRET_ENV

LOG_NAME = "worker.log"


class LocalBackend(GlideinBackend):
    """``token_file``: the pool token, passed to workers as a path (argv is visible to all local
    users); token values in the environment are not passed on. ``ca_file``: what workers trust
    for an https:// service."""
    name = "local"

    def __init__(self, service_url: str, work_dir: str | Path,
                 worker_args: Optional[list[str]] = None,
                 env: Optional[dict[str, str]] = None,
                 token_file: Optional[str | Path] = None, ca_file: Optional[str | Path] = None) -> None:
        self.service_url = service_url
        self.token_file = token_file
        self.ca_file = ca_file
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.worker_args = worker_args or []
        self.env = env or {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._seq = itertools.count(1)

    @classmethod
    def from_config(cls, config: FactoryConfig) -> "LocalBackend":
        return cls(config.service, config.local.work_dir, worker_args=config.local.worker_args,
                   token_file=config.local.token_file, ca_file=config.ca_file)

    def submit(self, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            gid = f"local.{os.getpid()}.{next(self._seq)}"
            wdir = self.work_dir / gid
            wdir.mkdir(parents=True, exist_ok=True)
            env = {k: v for k, v in {**os.environ, **self.env}.items() if k not in SECRET_ENV}
            env[GLIDEIN_ENV] = gid
            token = ["--token-file", str(self.token_file)] if self.token_file else []
            token += ["--ca-file", str(self.ca_file)] if self.ca_file else []
            with (wdir / LOG_NAME).open("ab") as log:
                self._procs[gid] = subprocess.Popen(
                    [sys.executable, "-m", "pcm_service.cli", "worker", "--service", self.service_url,
                     "--glidein-id", gid, "--work-dir", str(wdir), *token, *self.worker_args],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True)
            ids.append(gid)
        return ids

    def glideins(self) -> list[Glidein]:
        out = []
        for gid, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                out.append(Glidein(glidein_id=gid, state=GlideinState.RUNNING, host="localhost",
                                   detail=f"pid {proc.pid}"))
            else:
                out.append(Glidein(glidein_id=gid, state=GlideinState.EXITED, host="localhost",
                                   detail=f"exit code {code}"))
                del self._procs[gid]
                self._clear(gid)
        return out

    def _clear(self, gid: str) -> None:
        """What an ended glidein left: its processes killed, its scratch removed (the log stays)."""
        for _ in range(50):  # one may fork while the others are killed
            if not (left := marked(GLIDEIN_ENV, gid)):
                break
            kill_all(left)
            time.sleep(0.02)
        wdir = self.work_dir / gid
        scratch = [e for e in wdir.iterdir() if e.name != LOG_NAME] if wdir.is_dir() else []
        for entry in [*scratch, *Path(tempfile.gettempdir()).glob(f"{glidein_tmp_prefix(gid)}*")]:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def remove(self, glidein_ids: list[str]) -> None:
        for gid in glidein_ids:
            proc = self._procs.get(gid)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def evict(self, glidein_id: str, hard: bool) -> None:
        """SIGKILL the whole glidein (agent, library, engine) or SIGTERM its worker (it drains)."""
        proc = self._procs.get(glidein_id)
        if proc is not None and proc.poll() is None:
            if hard:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                self._clear(glidein_id)  # at once: its engine would hold cores a replacement needs
            else:
                proc.send_signal(signal.SIGTERM)

    def configure(self, config: FactoryConfig) -> None:
        self.worker_args = list(config.local.worker_args)
        if config.local.token_file:
            self.token_file = config.local.token_file
        if config.ca_file:
            self.ca_file = config.ca_file

    def pids(self) -> dict[str, int]:
        return {gid: p.pid for gid, p in self._procs.items() if p.poll() is None}

    def close(self, grace: float = 30.0) -> None:
        self.remove(list(self._procs))
        for gid, proc in self._procs.items():
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self._clear(gid)
        self._procs.clear()
