"""The factory: converge the number of glideins on the service's demand, within limits.

``decide`` is pure (glideins, workers, demand, policy → submit/remove) so every policy
case is a unit test; ``Factory`` does the I/O around it once per cycle and reports what it
saw and did to the service, where `pcm factory show` and `pcm status` read it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from factory.backends.base import BackendError, Glidein, GlideinBackend, GlideinState
from factory.config import (
    FactoryConfig,
    FactoryConfigError,
    file_digest,
    load_factory_config,
)
from factory.drill import EvictionDrill
from factory.metrics import FactoryMetrics
from pcm_service.client import ServiceClient, ServiceError
from pcm_service.protocol import (
    FactoryDecision,
    FactoryLimits,
    FactoryReport,
    FactoryView,
    ServiceStatus,
    WorkerState,
    WorkerStatus,
)

log = logging.getLogger("pcm.factory")


_DEFAULT = FactoryConfig.model_fields  # the one home of the factory's defaults


@dataclass
class Policy:
    per_cycle: int = FactoryLimits.model_fields["per_cycle"].default  # glideins submitted per cycle at most
    max_idle: float = _DEFAULT["max_idle"].default  # glideins waiting in the queue (idle or held) at most
    idle_grace: float = _DEFAULT["idle_grace"].default  # a worker idle this long may be removed
    held_timeout: float = _DEFAULT["held_timeout"].default  # a held glidein is removed after this long


def decide(wanted: int, glideins: list[Glidein], workers: list[WorkerStatus], policy: Policy,
           now: float, keep: Optional[int] = None) -> FactoryDecision:
    """Submit when short (capped per cycle and by the queue's idle cap); when over ``keep``
    (the highest recent demand, so a dip does not kill what a spike will need again), remove
    queued glideins first, then running ones with no worker yet, then idle workers — never a
    busy one: the service retires surplus busy workers after their batches."""
    keep = wanted if keep is None else max(keep, wanted)
    held = [g for g in glideins if g.state == GlideinState.HELD]
    expired = [g.glidein_id for g in held if now - (g.since or now) >= policy.held_timeout]
    alive = [g for g in glideins if g.state in (GlideinState.IDLE, GlideinState.RUNNING)]
    queued = [g.glidein_id for g in alive if g.state == GlideinState.IDLE]
    n = len(alive)
    held_note = f"; remove {len(expired)} held" if expired else ""
    if n < wanted:
        room = max(0, policy.max_idle - len(queued) - len(held))
        k = int(min(wanted - n, policy.per_cycle, room))
        capped = "" if k == min(wanted - n, policy.per_cycle) else \
            f" (capped: {len(queued)} idle + {len(held)} held in the queue, max_idle {policy.max_idle:g})"
        return FactoryDecision(at=now, wanted=wanted, submit=k, remove=expired,
                               reason=f"{n} glideins < {wanted} wanted: submit {k}{capped}{held_note}")
    if n <= keep:
        why = f"{n} glideins = {wanted} wanted" if n == wanted else \
            f"{n} glideins > {wanted} wanted, kept for recent demand {keep}"
        return FactoryDecision(at=now, wanted=wanted, remove=expired, reason=why + held_note)
    busy: set[str] = set()
    idle: set[str] = set()
    for w in workers:
        if not w.glidein_id:
            continue
        if w.inflight_batches or w.state not in (WorkerState.IDLE, WorkerState.BUSY) \
                or w.idle_seconds < policy.idle_grace:
            busy.add(w.glidein_id)  # mid-batch, starting, draining, or just finished a batch
        else:
            idle.add(w.glidein_id)
    running = [g.glidein_id for g in alive if g.state == GlideinState.RUNNING]
    no_worker = [g for g in running if g not in busy and g not in idle]
    idle_ones = [g for g in running if g in idle and g not in busy]
    removable = (queued[::-1] + no_worker + idle_ones)[: n - keep]
    n_busy = n - len(queued) - len(no_worker) - len(idle_ones)
    return FactoryDecision(
        at=now, wanted=wanted, remove=removable + expired,
        reason=f"{n} glideins > {keep} wanted: remove {len(removable)} ({len(queued)} queued,"
               f" {len(no_worker)} without worker, {len(idle_ones)} idle; {n_busy} busy stay){held_note}")


class DemandWindow:
    """The highest demand seen in the last ``delay`` seconds: scale down only once a drop has
    lasted, so flapping demand does not submit and remove the same glideins over and over."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.seen: deque[tuple[float, int]] = deque()

    def keep(self, now: float, wanted: int) -> int:
        self.seen.append((now, wanted))
        while self.seen and now - self.seen[0][0] > self.delay:
            self.seen.popleft()
        return max(w for _, w in self.seen)


class Factory:
    def __init__(self, client: ServiceClient, backend: GlideinBackend, config: FactoryConfig,
                 config_path: Optional[Path] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.backend = backend
        self.config = config
        self.config_path = config_path
        self._config_digest = file_digest(config_path) if config_path else ""
        self.clock = clock
        self.decisions: deque[FactoryDecision] = deque(maxlen=20)
        self.window = DemandWindow(config.scale_down_delay)
        self.exited: deque[Glidein] = deque(maxlen=20)
        self.reported_held: set[str] = set()
        self.stop_event = threading.Event()
        self.drill = EvictionDrill(config.eviction) if config.eviction else None
        self.metrics = FactoryMetrics(config.name)

    # ----- configuration ----------------------------------------------------------
    def apply_config_limits(self) -> Optional[FactoryLimits]:
        """Push the file's limits when they differ from what a config file last applied, so a
        restart with the same file keeps a later `pcm factory set`."""
        if self.config.limits is None:
            return None
        view: FactoryView = self.client.request("GET", "/factory", response=FactoryView)
        if view.config_limits == self.config.limits:
            return None
        log.info("applying limits from the config file: %s", self.config.limits.model_dump())
        return self.client.request("PUT", "/factory/limits", self.config.limits, FactoryLimits,
                                   from_config="true")

    def reload_if_changed(self) -> bool:
        if self.config_path is None:
            return False
        digest = file_digest(self.config_path)
        if digest == self._config_digest:
            return False
        self._config_digest = digest
        try:
            cfg = load_factory_config(self.config_path)
        except FactoryConfigError as e:
            log.error("config %s not reloaded, keeping the previous one: %s", self.config_path, e)
            return False
        if cfg.backend != self.config.backend:
            log.error("config %s: changing the backend needs a restart; other changes applied",
                      self.config_path)
            cfg = cfg.model_copy(update={"backend": self.config.backend})
        if cfg.eviction != self.config.eviction:
            self.drill = EvictionDrill(cfg.eviction) if cfg.eviction else None
        self.config = cfg
        self.window.delay = cfg.scale_down_delay
        self.backend.configure(cfg)
        log.info("config %s reloaded", self.config_path)
        self.apply_config_limits()
        return True

    # ----- one cycle --------------------------------------------------------------
    def policy(self, limits: FactoryLimits) -> Policy:
        c = self.config
        return Policy(per_cycle=limits.per_cycle, max_idle=c.max_idle, idle_grace=c.idle_grace,
                      held_timeout=c.held_timeout)

    def cycle(self) -> FactoryDecision:
        self.reload_if_changed()
        status: ServiceStatus = self.client.request("GET", "/status", response=ServiceStatus)
        demand = status.demand
        glideins = self.backend.glideins()
        now = self.clock()
        self._note(glideins)
        self.metrics.saw(glideins)
        self.metrics.wanted.set(demand.workers_wanted)
        d = decide(demand.workers_wanted, glideins, status.workers, self.policy(demand.limits), now,
                   keep=self.window.keep(now, demand.workers_wanted))
        if d.remove:
            self.backend.remove(d.remove)
            self.metrics.removed.inc(len(d.remove))
            log.info("%s: removed %s", d.reason, ", ".join(d.remove))
        if d.submit:
            ids = self.backend.submit(d.submit)
            self.metrics.submitted.inc(len(ids))
            log.info("%s: %s", d.reason, ", ".join(ids))
        if not self.decisions or d.submit or d.remove or d.reason != self.decisions[-1].reason:
            self.decisions.append(d)
        if self.drill is not None:
            self._drill(now, demand.workers_wanted, glideins, status.workers)
        self.report(glideins)
        return d

    def _drill(self, now: float, wanted: int, glideins: list[Glidein], workers: list[WorkerStatus]) -> None:
        assert self.drill is not None
        victim = self.drill.pick(now, glideins, workers)
        if victim is not None and victim.glidein_id:
            evicted = self.drill.decision(now, wanted, victim)
            self.backend.evict(victim.glidein_id, hard=self.drill.settings.signal == "kill")
            self.metrics.evicted.inc()
            log.warning("%s", evicted.reason)
            self.decisions.append(evicted)

    def _note(self, glideins: list[Glidein]) -> None:
        self.reported_held &= {g.glidein_id for g in glideins if g.state == GlideinState.HELD}
        for g in glideins:
            if g.state == GlideinState.EXITED:
                log.info("glidein %s left the queue (%s)", g.glidein_id, g.detail)
                self.exited.append(g)
            elif g.state == GlideinState.HELD and g.glidein_id not in self.reported_held:
                log.warning("glidein %s is held: %s", g.glidein_id, g.detail)
                self.reported_held.add(g.glidein_id)

    def report(self, glideins: list[Glidein]) -> None:
        live = [g for g in glideins if g.state != GlideinState.EXITED]
        try:
            self.client.request("POST", "/factory/report", FactoryReport(
                factory=self.config.name, backend=self.backend.name, at=self.clock(),
                glideins=live + list(self.exited), decisions=list(self.decisions)))
        except ServiceError as e:
            log.warning("could not report to the service: %s", e.detail)

    def run(self, cycles: Optional[int] = None) -> None:
        n = 0
        while not self.stop_event.is_set() and (cycles is None or n < cycles):
            try:
                with self.metrics.cycle_seconds.time():
                    self.cycle()
            except ServiceError as e:
                self.metrics.service_failures.inc()
                log.warning("factory cycle skipped: %s", e.detail)
            except BackendError as e:
                self.metrics.backend_failures.inc()
                log.error("factory cycle skipped: %s", e)
            self.metrics.cycles.inc()
            n += 1
            self.stop_event.wait(self.config.interval)

    def stop(self) -> None:
        self.stop_event.set()
