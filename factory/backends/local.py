"""Glideins as local subprocesses: the embedded default for `pcm run` and tests."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from factory.backends.base import Glidein, GlideinBackend, GlideinState
from factory.config import FactoryConfig
from pcm_service.tokens import SECRET_ENV


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
            env["PCM_GLIDEIN_ID"] = gid
            token = ["--token-file", str(self.token_file)] if self.token_file else []
            token += ["--ca-file", str(self.ca_file)] if self.ca_file else []
            with (wdir / "worker.log").open("ab") as log:
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
        return out

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
        for proc in self._procs.values():
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
