"""A glidein of the TaskVine executor: `pcm worker` runs ``vine_worker`` against the service's
TaskVine manager instead of an agent, with the cores, memory, GPUs and disk HTCondor gave the
slot, the pool token as TaskVine's password file, and the glidein id in the os string it
reports (how the service matches the manager's workers to glideins). The glidein
(worker_image/glidein.py) starts it, passes SIGTERM on and stops what it leaves behind."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from pcm_service.protocol import ExecutorInfo, Resources, glidein_os
from pcm_service.tokens import write_secret
from worker_image.settings import detect_resources

log = logging.getLogger("pcm.worker")
PASSWORD_FILE = "vine.password"


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


def start_vine_worker(service_url: str, info: ExecutorInfo, token: str, glidein_id: Optional[str],
                      work: Path, preexec: Optional[Callable[[], None]] = None) -> Optional[subprocess.Popen[bytes]]:
    """Start vine_worker with its workspace in ``work/vine`` (the glidein removes it, whatever
    way vine_worker ends); None where vine_worker is not installed."""
    (work / "vine").mkdir(parents=True, exist_ok=True)
    password = work / PASSWORD_FILE
    write_secret(password, token)
    # the library runs `python` from PATH: it must be this environment's, which imports PCM (a job
    # may have no PATH at all: then the default search path follows, for lscpu and the like)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    binary = shutil.which("vine_worker", path=path)
    if binary is None:
        log.error("the service runs the TaskVine executor but vine_worker is not installed here:"
                  " `make taskvine`, or conda install -c conda-forge ndcctools")
        return None
    argv = vine_worker_argv(binary, service_url, info, password, detect_resources(), work, glidein_id)
    log.info("TaskVine worker for glidein %s: %s", glidein_id or "-", " ".join(argv))
    return subprocess.Popen(argv, env={**os.environ, "PATH": path}, stdin=subprocess.DEVNULL,
                            preexec_fn=preexec)


def remove_workspace(work: Path) -> None:
    """What vine_worker keeps in the glidein's work directory: gone with it (a vine_worker that
    exits cleanly removes its workspace itself; one that is killed cannot)."""
    shutil.rmtree(work / "vine", ignore_errors=True)
    (work / PASSWORD_FILE).unlink(missing_ok=True)
