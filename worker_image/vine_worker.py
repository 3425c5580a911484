"""A glidein of the TaskVine executor: `pcm worker` runs ``vine_worker`` against the service's
TaskVine manager instead of an agent, with the cores, memory, GPUs and disk HTCondor gave the
slot, the pool token as TaskVine's password file, and the glidein id in the os string it
reports (how the service matches the manager's workers to glideins). SIGTERM (eviction,
removal) is passed on; the exit status is vine_worker's. It stays in the glidein's process
group, so a hard eviction (HTCondor, the local backend's killpg) takes all of it."""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from pcm_service.protocol import ExecutorInfo, Resources, glidein_os
from pcm_service.tokens import write_secret
from worker_image.processes import stat_fields
from worker_image.settings import detect_resources

log = logging.getLogger("pcm.worker")


def slot_ad() -> dict[str, int]:
    """The slot's Cpus, Memory (MB), Disk (KiB) and GPUs from HTCondor's machine ad (empty
    outside HTCondor): what the slot was given, not what the machine has."""
    ad = os.environ.get("_CONDOR_MACHINE_AD")
    if not ad or not os.path.isfile(ad):
        return {}
    text = Path(ad).read_text(errors="replace")
    return {k: int(m.group(1)) for k in ("Cpus", "Memory", "Disk", "GPUs")
            if (m := re.search(rf"^{k}\s*=\s*(\d+)", text, re.M))}


def vine_worker_argv(binary: str, service_url: str, info: ExecutorInfo, password_file: Path,
                     resources: Resources, work_dir: Path, glidein_id: Optional[str]) -> list[str]:
    host = urlsplit(service_url).hostname or "127.0.0.1"
    slot = slot_ad()
    # TaskVine sets OMP_NUM_THREADS to a task's cores: more than the slot has would oversubscribe it
    argv = [binary, "--cores", str(slot.get("Cpus", resources.cpus)), "--gpus", str(len(resources.gpus)),
            "--password", str(password_file), "--workdir", str(work_dir / "vine")]
    memory = slot.get("Memory", resources.memory_mb)
    if memory:
        argv += ["--memory", str(memory)]
    if "Disk" in slot:
        argv += ["--disk", str(slot["Disk"] // 1024)]
    if glidein_id:
        argv += ["--os", glidein_os(glidein_id)]
    if info.ssl:
        argv.append("--ssl")
    return [*argv, host, str(info.port)]


def run_vine_worker(service_url: str, info: ExecutorInfo, token: str, glidein_id: Optional[str],
                    work_dir: Optional[Path]) -> int:
    work = Path(work_dir or Path.cwd() / "pcm-worker")
    (work / "vine").mkdir(parents=True, exist_ok=True)
    password = work / "vine.password"
    write_secret(password, token)
    # the library runs `python` from PATH: it must be this environment's, which imports PCM (a job
    # may have no PATH at all: then the default search path follows, for lscpu and the like)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    binary = shutil.which("vine_worker", path=path)
    if binary is None:
        log.error("the service runs the TaskVine executor but vine_worker is not installed here:"
                  " `make taskvine`, or conda install -c conda-forge ndcctools")
        return 2
    argv = vine_worker_argv(binary, service_url, info, password, detect_resources(), work, glidein_id)
    log.info("TaskVine worker for glidein %s: %s", glidein_id or "-", " ".join(argv))
    child = subprocess.Popen(argv, env={**os.environ, "PATH": path}, stdin=subprocess.DEVNULL)

    def forward(sig: int, _frame: object) -> None:
        child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    kill_leftovers()
    return rc


def kill_leftovers() -> None:
    """What vine_worker forked (its transfer server, the library and its engine) outlives a
    vine_worker killed alone and keeps its connection to the manager open: the rest of this
    glidein's process group goes with it (not this process or its parents, e.g. entry.sh),
    so the manager sees the worker leave."""
    keep, pid = {os.getpid()}, os.getppid()
    while pid > 1:
        keep.add(pid)
        if (f := stat_fields(pid)) is None:
            break
        pid = int(f[1])
    group = os.getpgrp()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in keep:
            continue
        if (f := stat_fields(int(d.name))) is not None and int(f[2]) == group:
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                continue  # gone meanwhile, or not ours to kill
