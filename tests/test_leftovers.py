"""A glidein that goes leaves nothing behind, for both executors: glideins of the local
backend (the real `pcm worker` processes `pcm run` and the factory start) are stopped three
ways once their engine is starting: SIGKILL of the worker alone (the agent, or vine_worker,
not the glidein), removal (SIGTERM: the worker drains) and a hard eviction (SIGKILL of the
glidein's process group). Afterwards no process marked with the glidein's PCM_GLIDEIN_ID (or
below its glidein process) is alive and its scratch is gone: the glidein's directory holds
only worker.log, the agent's library socket directory and vine_worker's workspace are gone."""
from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from factory.backends.local import LocalBackend
from pcm_service.protocol import GlideinState, SubmitResponse
from pcm_service.workload import load_workload
from tests.support.serve import ServeProcess
from tests.support.waiting import wait_for
from tests.support.workloads import write_engine_workload

pytestmark = pytest.mark.engine
WAYS = ("kill-worker", "remove", "evict")


def glidein_processes(gid: str) -> list[psutil.Process]:
    """Every live process whose environment names this glidein."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("PCM_GLIDEIN_ID") == gid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def gone(gid: str) -> bool:
    return not glidein_processes(gid)


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def library_of(gid: str, marker: str) -> psutil.Process | None:
    """The glidein's library process, once it has started children of its own (its engine's)."""
    for p in glidein_processes(gid):
        try:
            if marker in cmdline(p) and p.children():
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def worker_of(backend: LocalBackend, gid: str, executable: str) -> psutil.Process:
    """The worker the glidein supervises: its child running ``executable`` (the glidein process
    itself where it runs the worker in-process)."""
    glidein = psutil.Process(backend.pids()[gid])
    return next((c for c in glidein.children() if executable in cmdline(c)), glidein)


@pytest.fixture
def glideins(tiny_model: Path, tmp_path: Path) -> Iterator[Callable[..., dict[str, dict[str, Any]]]]:
    """Three glideins of one executor against a real `pcm serve`, each stopped one way once its
    library has started children; what each left behind."""
    stack: list[tuple[ServeProcess, LocalBackend]] = []

    def run(*serve_args: str, library: str, worker: str) -> dict[str, dict[str, Any]]:
        serve = ServeProcess(tmp_path / "state", *serve_args).start()
        backend = LocalBackend(serve.url, tmp_path / "glideins", token_file=serve.pool_token_file)
        stack.append((serve, backend))
        sub = load_workload(write_engine_workload(tmp_path, tiny_model, 300, batch_size=5))
        serve.client().request("POST", "/workloads", sub, SubmitResponse)
        gids = dict(zip(WAYS, backend.submit(len(WAYS)), strict=True))
        seen: dict[str, dict[str, Any]] = {}
        for way, gid in gids.items():
            lib = wait_for(partial(library_of, gid, library), 300, f"the library of glidein {gid}")
            victim = worker_of(backend, gid, worker)
            seen[way] = {"gid": gid, "library": cmdline(lib), "worker": victim.pid,
                         "processes": len(glidein_processes(gid))}
            if way == "kill-worker":
                victim.send_signal(signal.SIGKILL)
            elif way == "remove":
                backend.remove([gid])
            else:
                backend.evict(gid, hard=True)
        exited: set[str] = set()

        def all_exited() -> bool:
            exited.update(g.glidein_id for g in backend.glideins() if g.state == GlideinState.EXITED)
            return exited >= set(gids.values())

        wait_for(all_exited, 120, "every glidein to exit")
        for way, gid in gids.items():
            wait_for(partial(gone, gid), 10, f"glidein {gid}'s processes to go")
            seen[way]["files"] = sorted(p.name for p in (tmp_path / "glideins" / gid).iterdir())
        return seen

    yield run
    for serve, backend in stack:
        backend.close(grace=5)
        serve.stop()


def test_a_native_glidein_leaves_no_process_and_no_scratch(glideins: Callable[..., Any]) -> None:
    seen = glideins(library="worker_image.library", worker="pcm_service.cli worker")
    for way, s in seen.items():
        assert s["processes"] >= 4, (way, s)  # glidein, agent, library, the library's children
        assert s["files"] == ["worker.log"], (way, s)  # no model cache, context file or library log
        sock = s["library"].split("--address ")[1].split()[0]  # in the glidein's own temporary directory
        assert f"pcm-glidein-{s['gid']}-" in sock and not Path(sock).parent.parent.exists(), (way, sock)


def test_a_taskvine_glidein_leaves_no_process_and_no_scratch(glideins: Callable[..., Any]) -> None:
    from tests.support.taskvine import require_taskvine

    require_taskvine()
    seen = glideins("--executor", "taskvine", "--vine-port", "0", library="library_code.py", worker="vine_worker")
    for way, s in seen.items():
        # glidein, vine_worker, its transfer server, the library (sh and python) and its children
        assert s["processes"] >= 5, (way, s)
        assert s["files"] == ["worker.log"], (way, s)  # no workspace, no password file
        assert not Path(f"/tmp/worker-{os.getuid()}-{s['worker']}").exists()  # nor vine_worker's default one
