"""How many workers the remaining work needs.

A new worker is only worth asking for if it will arrive (time-to-ready: fetch + load) well
before the work is done; while much work is left that is many workers (the opportunistic
case: idle slots cost nothing). Growth is damped the way Kubernetes' HPA damps scale-up
(at most +4 or x2 per 15 s) so one spike does not flood the pool; a drop applies at once
(the factory waits ``scale_down_delay`` before removing anything, and never a busy worker).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

from pcm_service.protocol import Demand, FactoryLimits


@dataclass
class DemandPolicy:
    ready_estimate: float = 60.0  # time-to-ready assumed until a worker has measured it
    useful_ratio: float = 1.0  # a new worker must work at least this many times its time-to-ready
    batches_per_worker: int = 4  # before any throughput is measured: 1 worker per this many batches
    window: float = 60.0  # seconds of row reports a throughput is measured over
    min_span: float = 3.0  # a worker's rate counts once it has run this long in the window
    ramp_period: float = 15.0  # growth limit: within this period ...
    ramp_add: int = 4  # ... wanted may grow by this many workers
    ramp_factor: float = 2.0  # ... or to this multiple, whichever is more


@dataclass
class WorkLeft:
    rows: int
    batches: int


def raw_demand(work: WorkLeft, ready_workers: int, rate: Optional[float], time_to_ready: float,
               policy: DemandPolicy) -> tuple[int, str]:
    """Workers the work needs, and why.

    With n ready workers at ``rate`` rows/s each and m newcomers ready after T seconds, the
    work (W/rate worker-seconds) ends after D = (W/rate + m*T) / (n + m). Each newcomer works
    D - T seconds; it is worth its context cost while D - T >= useful_ratio * T, which gives
    m <= (W/rate - (1 + a)*T*n) / (a*T).
    """
    if work.rows <= 0:
        return 0, "no rows left"
    if rate is None or rate <= 0:
        n = math.ceil(work.batches / policy.batches_per_worker)
        return max(1, n), (f"{work.rows} rows left, no throughput measured yet: 1 worker per"
                           f" {policy.batches_per_worker} batches → {n}")
    seconds = work.rows / rate
    a, t = policy.useful_ratio, max(time_to_ready, 1e-3)
    head = f"{work.rows} rows left at {rate:.2f} rows/s per worker = {seconds:.0f} worker·s"
    m = max(0, math.floor((seconds - (1 + a) * t * ready_workers) / (a * t)))
    if m == 0 and ready_workers:
        return min(ready_workers, work.batches), (
            f"{head}; the {ready_workers} ready finish in ~{seconds / ready_workers:.0f}s, too soon"
            f" for a newcomer (ready after {t:.0f}s) to help")
    wanted = max(1, min(ready_workers + m, work.batches))
    return wanted, (f"{head}; {ready_workers} ready + {m} new, each working >= {a * t:.0f}s after"
                    f" {t:.0f}s to get ready → {wanted}"
                    + (f" (capped at {work.batches} batches left)" if ready_workers + m > work.batches else ""))


class Ramp:
    """Damps growth: wanted may reach max(base + add, base * factor), where base is what was
    given out ``ramp_period`` ago, so the pool at most doubles (or grows by ``add``) per period
    however often demand is asked for."""

    def __init__(self, policy: DemandPolicy) -> None:
        self.policy = policy
        self.base = 0
        self.given: deque[tuple[float, int]] = deque()

    def limit(self, raw: int, now: float) -> int:
        p = self.policy
        while self.given and now - self.given[0][0] >= p.ramp_period:
            self.base = self.given.popleft()[1]
        value = min(raw, max(self.base + p.ramp_add, math.ceil(self.base * p.ramp_factor)))
        self.given.append((now, value))
        return value


class ThroughputMeter:
    """Rows per second per worker, from the rows each worker reported in the last ``window``."""

    def __init__(self, policy: DemandPolicy) -> None:
        self.policy = policy
        self.started: dict[str, float] = {}  # worker → when it got its first batch
        self.reports: dict[str, deque[tuple[float, int]]] = {}

    def leased(self, worker_id: str, now: float) -> None:
        self.started.setdefault(worker_id, now)

    def rows(self, worker_id: str, n: int, now: float) -> None:
        if n > 0:
            self.started.setdefault(worker_id, now)
            self.reports.setdefault(worker_id, deque()).append((now, n))

    def forget(self, worker_id: str) -> None:
        self.started.pop(worker_id, None)
        self.reports.pop(worker_id, None)

    def worker_rates(self, now: float, min_span: Optional[float] = None) -> dict[str, float]:
        """Rows/s of each worker that has run at least ``min_span`` (default: the policy's)
        within the window."""
        p = self.policy
        floor = p.min_span if min_span is None else min_span
        rates = {}
        for wid, q in self.reports.items():
            while q and now - q[0][0] > p.window:
                q.popleft()
            span = now - max(now - p.window, self.started.get(wid, now))
            if q and span >= floor:
                rates[wid] = sum(n for _, n in q) / span
        return rates

    def rate(self, now: float) -> Optional[float]:
        rates = self.worker_rates(now)
        return sum(rates.values()) / len(rates) if rates else None


def clamp(wanted: int, raw_reason: str, raw: int, limits: FactoryLimits) -> tuple[int, str]:
    out = max(limits.min_workers, min(limits.max_workers, wanted))
    damped = f"; damped to {wanted}" if wanted != raw else ""
    return out, f"{raw_reason}{damped}; limits [{limits.min_workers}, {limits.max_workers}] → {out}"


def make_demand(work: WorkLeft, ready_workers: int, rate: Optional[float],
                time_to_ready: Optional[float], limits: FactoryLimits, ramp: Ramp,
                now: float) -> Demand:
    p = ramp.policy
    t = time_to_ready if time_to_ready is not None else p.ready_estimate
    raw, why = raw_demand(work, ready_workers, rate, t, p)
    wanted, reason = clamp(ramp.limit(raw, now), why, raw, limits)
    return Demand(workers_wanted=wanted, reason=reason, limits=limits, raw=raw, rows_left=work.rows,
                  batches_left=work.batches, rows_per_worker_second=rate, time_to_ready=t,
                  ready_measured=time_to_ready is not None)
