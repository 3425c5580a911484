"""The factory's side of the service: limits, reports of glideins, demand."""
from __future__ import annotations

from typing import Callable

from pcm_service.core.demand import Ramp, ThroughputMeter, make_demand
from pcm_service.core.factories import FactoryRegistry
from pcm_service.core.views import demand_inputs
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    Demand,
    FactoryLimits,
    FactoryReport,
    FactoryView,
    GlideinState,
    WorkerState,
)
from pcm_service.store import Store, in_list

Retire = Callable[[str, WorkerState], int]  # Workers.retire: a worker gone, its batches requeued


class Pool:
    """Limits and reports for the factories, and the demand they follow. ``retire``: what a
    worker whose glidein exited goes through (the workers' part owns it)."""

    def __init__(self, store: Store, clock: Callable[[], float], factories: FactoryRegistry,
                 throughput: ThroughputMeter, ramp: Ramp, retire: Retire) -> None:
        self.store, self.clock, self.factories = store, clock, factories
        self.throughput, self.ramp, self.retire = throughput, ramp, retire

    def factory_limits(self) -> FactoryLimits:
        return self.factories.limits()

    def set_factory_limits(self, limits: FactoryLimits, from_config: bool = False) -> FactoryLimits:
        return self.factories.set_limits(limits, from_config)

    def factory_report(self, rep: FactoryReport) -> list[str]:
        """Store the report; a worker whose glidein has left the batch system is gone: its
        leases expire now instead of after ``worker_timeout``. Returns those workers."""
        self.factories.report(rep)
        gone = [g.glidein_id for g in rep.glideins if g.state == GlideinState.EXITED]
        if not gone:
            return []
        with self.store.read() as db:
            live, states = in_list(LIVE_WORKER_STATES)
            marks, ids = in_list(gone)
            lost = [r["worker_id"] for r in db.execute(
                f"SELECT worker_id FROM workers WHERE state IN {live} AND glidein_id IN {marks}", (*states, *ids))]
        for worker_id in lost:
            self.retire(worker_id, WorkerState.LOST)
        return lost

    def factory_view(self) -> FactoryView:
        return self.factories.view(self.clock())

    def demand(self) -> Demand:
        now = self.clock()
        limits = self.factory_limits()
        with self.store.read() as db:
            work, ready, t_ready = demand_inputs(db)
        return make_demand(work, ready, self.throughput.rate(now), t_ready, limits, self.ramp, now)
