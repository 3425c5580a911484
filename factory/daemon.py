"""The factory: converge the number of glideins on the service's demand, within limits."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from factory.backends.base import Glidein, GlideinBackend, GlideinState
from pcm_service.client import ServiceClient, ServiceError
from pcm_service.protocol import Demand, ServiceStatus, WorkerStatus

log = logging.getLogger("pcm.factory")


@dataclass
class Decision:
    submit: int = 0
    remove: list[str] = field(default_factory=list)
    reason: str = ""
    at: float = field(default_factory=time.time)


def decide(wanted: int, per_cycle: int, glideins: list[Glidein], workers: list[WorkerStatus],
           idle_grace: float = 5.0) -> Decision:
    """Submit up to ``per_cycle`` when short; when over, remove queued glideins first,
    then ones whose worker has not started, then idle workers — never a busy one."""
    alive = [g for g in glideins if g.state in (GlideinState.IDLE, GlideinState.RUNNING)]
    n = len(alive)
    if n < wanted:
        k = min(wanted - n, per_cycle)
        return Decision(submit=k, reason=f"{n} glideins < {wanted} wanted: submit {k}")
    if n == wanted:
        return Decision(reason=f"{n} glideins = {wanted} wanted")
    by_glidein = {w.glidein_id: w for w in workers if w.glidein_id}
    queued = [g.glidein_id for g in alive if g.state == GlideinState.IDLE]
    no_worker = [g.glidein_id for g in alive
                 if g.state == GlideinState.RUNNING and g.glidein_id not in by_glidein]
    idle = [g.glidein_id for g in alive if (w := by_glidein.get(g.glidein_id)) is not None
            and w.inflight_batches == 0 and w.idle_seconds >= idle_grace
            and w.state.value in ("idle", "busy")]
    removable = (queued + no_worker + idle)[: n - wanted]
    return Decision(remove=removable,
                    reason=f"{n} glideins > {wanted} wanted: remove {len(removable)}"
                           f" ({len(queued)} queued, {len(no_worker)} without worker, {len(idle)} idle)")


class Factory:
    def __init__(self, client: ServiceClient, backend: GlideinBackend, interval: float = 2.0,
                 idle_grace: float = 5.0) -> None:
        self.client = client
        self.backend = backend
        self.interval = interval
        self.idle_grace = idle_grace
        self.decisions: deque[Decision] = deque(maxlen=20)
        self.stop_event = threading.Event()

    def cycle(self) -> Decision:
        demand: Demand = self.client.request("GET", "/demand", response=Demand)
        status: ServiceStatus = self.client.request("GET", "/status", response=ServiceStatus)
        glideins = self.backend.list()
        for g in glideins:
            if g.state == GlideinState.EXITED:
                log.info("glidein %s exited (%s)", g.glidein_id, g.detail)
        d = decide(demand.workers_wanted, demand.limits.per_cycle, glideins, status.workers,
                   self.idle_grace)
        if d.submit:
            ids = self.backend.submit(d.submit)
            log.info("%s: %s", d.reason, ", ".join(ids))
        if d.remove:
            self.backend.remove(d.remove)
            log.info("%s: %s", d.reason, ", ".join(d.remove))
        if d.submit or d.remove:
            self.decisions.append(d)
        return d

    def run(self, cycles: Optional[int] = None) -> None:
        n = 0
        while not self.stop_event.is_set() and (cycles is None or n < cycles):
            try:
                self.cycle()
            except ServiceError as e:
                log.warning("factory cycle skipped: %s", e.detail)
            n += 1
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
