"""The eviction drill: evict a random warm worker every ``interval`` seconds.

Like TaskVine's ``enforce-worker-eviction-interval``, it rehearses what opportunistic slots
do anyway (HTCondor vacates a job: SIGTERM, then SIGKILL; or just SIGKILL), so tests and
benchmarks can show that churn costs only the rows in flight. Targets are workers that
hold a loaded context (idle or busy): evicting one that is still starting costs no rows.
The first eviction comes ``interval`` seconds after the pool first has a warm worker.
"""
from __future__ import annotations

import random
from typing import Literal, Optional

from pydantic import Field

from pcm_service.protocol import (
    FactoryDecision,
    Glidein,
    GlideinState,
    Strict,
    WorkerState,
    WorkerStatus,
)


class EvictionSettings(Strict):
    interval: float = Field(gt=0)  # seconds between evictions
    signal: Literal["term", "kill"] = "kill"  # term: a vacate (the worker drains); kill: SIGKILL
    count: Optional[int] = Field(default=None, gt=0)  # stop after this many (None: never)
    seed: Optional[int] = None


class EvictionDrill:
    def __init__(self, settings: EvictionSettings) -> None:
        self.settings = settings
        self.next_at: Optional[float] = None  # set when a warm worker is first seen
        self.done = 0
        self.rng = random.Random(settings.seed)

    def pick(self, now: float, glideins: list[Glidein], workers: list[WorkerStatus]) -> Optional[WorkerStatus]:
        """The worker to evict now, if one is due: a random warm one on a running glidein."""
        s = self.settings
        if s.count is not None and self.done >= s.count:
            return None
        running = {g.glidein_id for g in glideins if g.state == GlideinState.RUNNING}
        warm = [w for w in workers if w.glidein_id in running
                and w.state in (WorkerState.IDLE, WorkerState.BUSY)]
        if self.next_at is None and warm:
            self.next_at = now + s.interval
        if not warm or self.next_at is None or now < self.next_at:
            return None  # not due, or due with nobody warm to evict: try again next cycle
        self.done += 1
        self.next_at = now + s.interval
        return self.rng.choice(warm)

    def decision(self, now: float, wanted: int, w: WorkerStatus) -> FactoryDecision:
        sig = "SIGKILL" if self.settings.signal == "kill" else "SIGTERM (vacate)"
        left = "" if self.settings.count is None else f" ({self.done}/{self.settings.count})"
        return FactoryDecision(
            at=now, wanted=wanted, remove=[w.glidein_id or ""],
            reason=f"eviction drill{left}: {sig} to glidein {w.glidein_id} (worker {w.worker_id},"
                   f" {w.inflight_batches} batches in flight)")
