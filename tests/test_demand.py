"""Demand from work: rows left, measured per-worker throughput, measured time-to-ready."""
from __future__ import annotations

import pytest

from pcm_service.core.demand import DemandPolicy, Ramp, ThroughputMeter, WorkLeft, make_demand, raw_demand
from pcm_service.protocol import FactoryLimits

P = DemandPolicy()


def test_no_rows_left_wants_nobody() -> None:
    assert raw_demand(WorkLeft(rows=0, batches=0), 3, 2.0, 60, P)[0] == 0


def test_before_any_measurement_one_worker_per_few_batches() -> None:
    n, why = raw_demand(WorkLeft(rows=100, batches=10), 0, None, 60, P)
    assert n == 3 and "no throughput measured yet" in why


def test_newcomers_that_would_arrive_after_the_work_is_done_are_not_asked_for() -> None:
    # 2 ready workers at 1 row/s finish 100 rows in 50 s; a newcomer needs 60 s to get ready
    n, why = raw_demand(WorkLeft(rows=100, batches=10), 2, 1.0, 60, P)
    assert n == 2 and "too soon for a newcomer" in why
    # fewer rows than ready workers can hold: no more than one worker per batch left
    assert raw_demand(WorkLeft(rows=3, batches=1), 2, 1.0, 60, P)[0] == 1


def test_much_work_left_asks_aggressively() -> None:
    # 100k rows at 5 rows/s = 20000 worker·s; each newcomer must work >= 120 s after 120 s of start
    n, _ = raw_demand(WorkLeft(rows=100_000, batches=10_000), 0, 5.0, 120, P)
    assert n == 166
    # a slower start (time-to-ready) makes each newcomer worth less: fewer are asked for
    assert raw_demand(WorkLeft(rows=100_000, batches=10_000), 0, 5.0, 600, P)[0] == 33
    # work is never split finer than batches
    assert raw_demand(WorkLeft(rows=100_000, batches=40), 0, 5.0, 120, P)[0] == 40


def test_someone_is_always_asked_for_while_rows_are_left() -> None:
    assert raw_demand(WorkLeft(rows=5, batches=1), 0, 100.0, 600, P)[0] == 1


def test_growth_is_damped_drops_are_not() -> None:
    ramp = Ramp(P)
    assert [ramp.limit(100, t) for t in (0, 1, 5, 14.9)] == [4, 4, 4, 4]
    assert ramp.limit(100, 15) == 8  # +4 or x2 per 15 s, whichever is more
    assert ramp.limit(100, 30) == 16
    assert ramp.limit(100, 45) == 32
    assert ramp.limit(3, 46) == 3  # demand fell: at once
    assert ramp.limit(100, 61) == 7  # grows again from what was given 15 s ago (3 at t=46)


def test_demand_is_clamped_to_the_factory_limits_and_says_why() -> None:
    d = make_demand(WorkLeft(rows=1000, batches=100), 0, None, None, FactoryLimits(max_workers=2),
                    Ramp(P), now=0)
    assert (d.raw, d.workers_wanted, d.ready_measured, d.time_to_ready) == (25, 2, False, 60)
    assert "damped to 4" in d.reason and "limits [0, 2] → 2" in d.reason
    d = make_demand(WorkLeft(rows=0, batches=0), 0, None, 30.0, FactoryLimits(min_workers=1, max_workers=2),
                    Ramp(P), now=0)
    assert (d.workers_wanted, d.ready_measured) == (1, True)


def test_throughput_is_rows_per_second_per_worker_over_the_window() -> None:
    m = ThroughputMeter(P)
    assert m.rate(0) is None
    m.leased("a", 0)
    m.leased("b", 0)
    for t in range(1, 11):
        m.rows("a", 4, t)  # 4 rows/s
        m.rows("b", 2, t)  # 2 rows/s
    assert m.rate(10) == pytest.approx(3.0)
    m.forget("b")
    assert m.rate(10) == pytest.approx(4.0)
    assert m.rate(200) is None  # nothing reported within the window
