"""TaskVine's workers as PCM worker records, from the manager's own view: registered when they
connect, heartbeated with what they run, retired when they leave. The records are what
demand, the factory (idle glideins, the eviction drill) and `pcm status` count; they hold no
leases (the manager's record does), so a lost vine worker requeues nothing: TaskVine reruns
its calls elsewhere."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from pcm_service.core import ServiceCore, UnknownWorker
from pcm_service.protocol import (
    GLIDEIN_IN_OS,
    ContextState,
    Heartbeat,
    LibraryEvent,
    Resources,
    VineWorkerView,
    WorkerKind,
    WorkerRegistration,
)

log = logging.getLogger("pcm.taskvine")


@dataclass
class VineRecord:
    worker_id: str
    view: dict[str, Any]
    glidein_id: Optional[str]
    libraries: dict[int, str] = field(default_factory=dict)  # library pid → context id, from its calls
    context_id: Optional[str] = None
    failed: bool = False


def _call_ids(view: dict[str, Any]) -> set[int]:
    return {int(v) for k, v in view.items() if k.startswith("current_task_") and k.endswith("_id")}


class VineWorkers:
    def __init__(self, core: ServiceCore) -> None:
        self.core = core
        self.by_addr: dict[str, VineRecord] = {}
        self.gone: set[str] = set()  # addresses PCM gave up on: never registered again

    def sync(self, views: list[dict[str, Any]], calls: dict[int, str], loading: Optional[str]) -> None:
        """Match the manager's workers: new ones registered, gone ones retired, the rest
        heartbeated. ``calls``: our calls in flight → context; ``loading``: the context a
        worker with no answered call yet is presumably loading."""
        seen = {v["addrport"]: v for v in views if v.get("addrport") and v["addrport"] not in self.gone}
        for addr in set(self.by_addr) - set(seen):
            rec = self.by_addr.pop(addr)
            log.info("TaskVine worker %s (%s) left", rec.worker_id, addr)
            self.core.retire(rec.worker_id)
        for addr, view in seen.items():
            rec = self.by_addr.get(addr) or self._register(addr, view)
            rec.view = view
            running = [c for c in _call_ids(view) if c in calls]
            state = (ContextState.FAILED if rec.failed else ContextState.READY if rec.context_id
                     else ContextState.LOADING if _call_ids(view) else ContextState.ABSENT)
            try:
                self.core.heartbeat(rec.worker_id, Heartbeat(
                    context_id=rec.context_id or (loading if state == ContextState.LOADING else None),
                    context_state=state, inflight_batches=len(running)))
            except UnknownWorker:  # its glidein left (or it went silent): gone, whatever the manager says
                self.gone.add(addr)
                del self.by_addr[addr]

    def _register(self, addr: str, view: dict[str, Any]) -> VineRecord:
        m = GLIDEIN_IN_OS.search(view.get("os", ""))
        reg = WorkerRegistration(
            host=view.get("hostname", "unknown"), pid=0, glidein_id=m.group(1) if m else None,
            kind=WorkerKind.VINE_WORKER,
            resources=Resources(cpus=max(1, int(view.get("cores_total", 1))),
                                memory_mb=max(0, int(view.get("memory_total", 0))),
                                gpus=[str(i) for i in range(int(view.get("gpus_total", 0)))]))
        rec = VineRecord(worker_id=self.core.register(reg).worker_id, view=view, glidein_id=reg.glidein_id)
        self.by_addr[addr] = rec
        log.info("TaskVine worker %s joined: %s (%s), glidein %s", rec.worker_id, reg.host, addr, reg.glidein_id)
        return rec

    def distrust(self, addr: str) -> None:
        """A worker that sent an untrusted answer: retired, and never registered again."""
        self.gone.add(addr)
        rec = self.by_addr.pop(addr, None)
        if rec is not None:
            self.core.retire(rec.worker_id)

    def record_of(self, addr: str) -> Optional[VineRecord]:
        return self.by_addr.get(addr)

    def saw_library(self, addr: str, lib: dict[str, Any]) -> None:
        """A call's answer names its library process: a new one is an engine start (or a failed one)."""
        rec = self.by_addr.get(addr)
        if rec is None or lib.get("pid") is None:
            return
        ctx = str(lib["context_id"])
        error = lib.get("error")
        if error:
            rec.failed = True
            self.core.library_event(rec.worker_id, LibraryEvent(context_id=ctx, state=ContextState.FAILED,
                                                                error=str(error)))
        elif rec.libraries.get(int(lib["pid"])) != ctx:
            rec.libraries[int(lib["pid"])] = ctx
            rec.context_id, rec.failed = ctx, False
            self.core.library_event(rec.worker_id, LibraryEvent(
                context_id=ctx, state=ContextState.READY, seconds=float(lib.get("load_seconds") or 0.0)))

    def views(self, calls: dict[int, str]) -> list[VineWorkerView]:
        out = []
        for addr, rec in self.by_addr.items():
            v = rec.view
            out.append(VineWorkerView(
                worker_id=rec.worker_id, host=v.get("hostname", "unknown"), addrport=addr, glidein_id=rec.glidein_id,
                cores=int(v.get("cores_total", 0)), memory_mb=int(v.get("memory_total", 0)),
                gpus=int(v.get("gpus_total", 0)), libraries=sorted(set(rec.libraries.values())),
                calls_running=len([c for c in _call_ids(v) if c in calls])))
        return out
