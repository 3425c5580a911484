"""The hot path's SQL (lease, report, heartbeat) reads through indexes: no statement scans the
rows or batches tables, and a lease or a report costs a few statements however many rows."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from pcm_service.core import ServiceConfig, ServiceCore
from pcm_service.protocol import (
    BatchReport,
    ContextSpec,
    ContextState,
    Heartbeat,
    LeaseRequest,
    LibraryEvent,
    RowIn,
    RowResult,
    WorkerRegistration,
    WorkloadSubmission,
)
from tests.support.clock import FakeClock
from tests.support.models import fake_model

BIG_TABLES = ("rows", "batches")


def plan_scans(conn: sqlite3.Connection, sql: str) -> list[str]:
    """The full scans of a big table in ``sql``'s query plan."""
    return [d for *_, d in conn.execute("EXPLAIN QUERY PLAN " + sql)
            if d.startswith("SCAN ") and d.split()[1] in BIG_TABLES]


def plan_uses(conn: sqlite3.Connection, sql: str, index: str) -> bool:
    return any(f"USING INDEX {index} " in d for *_, d in conn.execute("EXPLAIN QUERY PLAN " + sql))


def test_lease_report_heartbeat_use_indexes_and_few_statements(tmp_path: Path) -> None:
    core = ServiceCore(tmp_path / "state", ServiceConfig(model_roots=(tmp_path,)), clock=FakeClock())
    try:
        resp = core.submit(WorkloadSubmission(
            name="t", context=ContextSpec(model=str(fake_model(tmp_path / "m"))), batch_size=100,
            output=str(tmp_path / "out.jsonl"), rows=[RowIn(row_id=str(i), prompt="p") for i in range(5000)]))
        ctx = resp.context_id
        wid = core.register(WorkerRegistration(host="h", pid=1)).worker_id
        core.library_event(wid, LibraryEvent(context_id=ctx, state=ContextState.READY, seconds=1.0))
        seen: list[str] = []
        core.store._conn.set_trace_callback(seen.append)
        leased = core.lease_batch(wid, LeaseRequest(context_id=ctx, context_state=ContextState.READY, max_batches=4))
        lease_sql = list(seen)
        seen.clear()
        core.report(wid, *[BatchReport(batch_id=b.batch_id, results=[
            RowResult(idx=r.idx, text="t", finish_reason="stop") for r in b.rows]) for b in leased.batches])
        report_sql = list(seen)
        seen.clear()
        core.heartbeat(wid, Heartbeat(context_id=ctx, context_state=ContextState.READY, lease_seq=1))
        heartbeat_sql = list(seen)
        core.store._conn.set_trace_callback(None)
        assert len(leased.batches) == 4 and sum(len(b.rows) for b in leased.batches) == 400
        statements = [s for s in lease_sql + report_sql + heartbeat_sql if s.split()[0].upper() in (
            "SELECT", "UPDATE", "DELETE", "INSERT")]
        scans = {s: plan_scans(core.store._conn, s) for s in statements}
        assert not any(scans.values()), {s: p for s, p in scans.items() if p}
        # a row's result finds the row by its primary key, not by walking its batch's index
        # entries (which made a report of n rows cost n² steps)
        row_updates = {s for s in report_sql if s.startswith("UPDATE rows") and "idx=" in s}
        assert row_updates and all(plan_uses(core.store._conn, s, "sqlite_autoindex_rows_1") for s in row_updates)
        # a lease: a few statements for 4 batches of 100 rows; a report: one ownership check, a
        # few per batch and none per row besides its update (one executemany per batch, traced
        # once per row)
        assert len([s for s in lease_sql if not s.startswith(("BEGIN", "COMMIT"))]) <= 5, lease_sql
        assert len({s.split(" WHERE")[0] for s in report_sql if s.startswith("UPDATE rows")}) == 1
        assert len([s for s in report_sql if not s.startswith(("BEGIN", "COMMIT", "UPDATE rows SET state"))]) \
            <= 2 + 4 * 4, report_sql
    finally:
        core.close()
