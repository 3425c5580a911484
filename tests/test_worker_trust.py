"""A glidein host acts only for its own workers (issue 28, Found 1-4), tried as a malicious host
would against a real `pcm serve` over HTTP: with the pool token, its own worker's credential,
and the ids and batch numbers it can guess or read."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from pcm_service.client import ServiceClient, ServiceError
from pcm_service.protocol import (
    BatchReport,
    BatchReports,
    ContextSpec,
    ContextState,
    Heartbeat,
    IdleReport,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RowIn,
    RowResult,
    SubmitResponse,
    WorkerRegistration,
    WorkloadSubmission,
)
from tests.support.models import fake_model
from tests.support.serve import ServeProcess


def submit(serve: ServeProcess, tmp_path: Path, name: str = "w", n: int = 8) -> SubmitResponse:
    model = str(fake_model(tmp_path / "model"))
    sub: SubmitResponse = serve.client().request("POST", "/workloads", WorkloadSubmission(
        name=name, context=ContextSpec(model=model), batch_size=2, output=str(tmp_path / f"{name}.jsonl"),
        rows=[RowIn(row_id=str(i), prompt=f"p{i}") for i in range(n)]), SubmitResponse)
    return sub


def ready(wid: str, own: ServiceClient, ctx: str) -> None:
    """As an agent does: told which context to load, then its engine is ready."""
    assert own.request("POST", f"/workers/{wid}/lease", LeaseRequest(max_batches=0),
                       LeaseResponse).assign_context.context_id == ctx
    own.request("POST", f"/workers/{wid}/library", LibraryEvent(context_id=ctx, state=ContextState.READY))


def lease(wid: str, own: ServiceClient, ctx: str, n: int = 1) -> LeaseResponse:
    resp: LeaseResponse = own.request("POST", f"/workers/{wid}/lease", LeaseRequest(
        context_id=ctx, context_state=ContextState.READY, max_batches=n), LeaseResponse)
    return resp


def refused(call: object, status: int, code: str) -> None:
    with pytest.raises(ServiceError) as e:
        call()  # type: ignore[operator]
    assert (e.value.status, e.value.code) == (status, code), e.value.detail


def db(serve: ServeProcess) -> sqlite3.Connection:
    conn = sqlite3.connect(serve.state_dir / "pcm.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def texts(serve: ServeProcess, batch_id: int) -> list[object]:
    with db(serve) as conn:
        return [r[0] for r in conn.execute("SELECT text FROM rows WHERE batch_id=? ORDER BY idx", (batch_id,))]


def test_reports_for_another_workers_batch_or_a_queued_one_are_refused(serve: ServeProcess, tmp_path: Path) -> None:
    sub = submit(serve, tmp_path)
    (a, own_a), (b, own_b) = serve.join(WorkerRegistration(host="a", pid=1)), serve.join(
        WorkerRegistration(host="b", pid=2))
    ready(a, own_a, sub.context_id)
    ready(b, own_b, sub.context_id)
    [theirs] = lease(b, own_b, sub.context_id).batches
    queued = theirs.batch_id + 3  # the last of four: still queued
    forged = [RowResult(idx=r.idx, text="FORGED by A", finish_reason="stop") for r in theirs.rows]
    for batch_id in (theirs.batch_id, queued):
        for forgery in (BatchReport(batch_id=batch_id, results=forged), BatchReport(batch_id=batch_id, crashed=[0, 1])):
            refused(lambda f=forgery: own_a.request("POST", f"/workers/{a}/report", f), 409, "batch_not_leased")
    # one foreign batch among its own refuses the whole request: nothing of it is written
    [mine] = lease(a, own_a, sub.context_id).batches
    refused(lambda: own_a.request("POST", f"/workers/{a}/reports", BatchReports(reports=[
        BatchReport(batch_id=mine.batch_id, results=[RowResult(idx=mine.rows[0].idx, text="mine")]),
        BatchReport(batch_id=queued, results=forged)])), 409, "batch_not_leased")
    assert texts(serve, mine.batch_id) == [None, None] and texts(serve, queued) == [None, None]
    with db(serve) as conn:
        assert conn.execute("SELECT MAX(crashes) FROM rows").fetchone()[0] == 0
    real = [RowResult(idx=r.idx, text=f"real {r.idx}", finish_reason="stop") for r in theirs.rows]
    rep = own_b.request("POST", f"/workers/{b}/report", BatchReport(batch_id=theirs.batch_id, results=real))
    assert (rep["accepted"], rep["duplicates"]) == (2, 0)
    assert texts(serve, theirs.batch_id) == [f"real {r.idx}" for r in theirs.rows]


def test_no_worker_acts_with_another_workers_id(serve: ServeProcess, tmp_path: Path) -> None:
    sub = submit(serve, tmp_path)
    (_, own_a), (b, own_b) = serve.join(WorkerRegistration(host="a", pid=1)), serve.join(
        WorkerRegistration(host="b", pid=2))
    ready(b, own_b, sub.context_id)
    held = lease(b, own_b, sub.context_id, n=2)
    pool = serve.worker_client()
    for who in (own_a, pool):  # A's own credential, or the pool token, on B's routes
        for method, path, body in (("POST", "heartbeat", Heartbeat(batches=[], lease_seq=99)),
                                   ("POST", "lease", LeaseRequest()), ("POST", "idle", IdleReport(idle_seconds=999)),
                                   ("DELETE", "", None)):
            refused(lambda c=who, m=method, p=path, x=body: c.request(m, f"/workers/{b}/{p}".rstrip("/"), x),
                    403, "wrong_worker")
    refused(lambda: own_a.request("DELETE", "/workers/w-nobody"), 404, "worker_unknown")
    r = httpx.post(f"{serve.url}/v1/pcm/workers/{b}/heartbeat", json={})
    assert r.status_code == 401
    with db(serve) as conn:
        assert conn.execute("SELECT state FROM workers WHERE worker_id=?", (b,)).fetchone()[0] != "retired"
        assert {r[0] for r in conn.execute("SELECT batch_id FROM batches WHERE worker_id=? AND state='leased'",
                                           (b,))} == {x.batch_id for x in held.batches}
    own_b.request("POST", f"/workers/{b}/heartbeat", Heartbeat(  # B itself is still B
        context_id=sub.context_id, context_state=ContextState.READY, inflight_batches=2,
        batches=[x.batch_id for x in held.batches], lease_seq=held.lease_seq))


def test_engine_failures_count_only_for_the_context_a_worker_was_given(serve: ServeProcess, tmp_path: Path) -> None:
    sub = submit(serve, tmp_path)
    outsider, own = serve.join(WorkerRegistration(host="x", pid=1))
    failed = LibraryEvent(context_id=sub.context_id, state=ContextState.FAILED, error="FORGED failure")
    for _ in range(4):
        refused(lambda: own.request("POST", f"/workers/{outsider}/library", failed), 409, "context_not_assigned")
    st = serve.client().request("GET", f"/workloads/{sub.workload_id}")
    assert st["rows_failed"] == 0 and st["state"] == "running"
    # the assigned worker's failures count, and a ready engine starts the count again
    w, own_w = serve.join(WorkerRegistration(host="w", pid=2))
    assert own_w.request("POST", f"/workers/{w}/lease", LeaseRequest(max_batches=0),
                         LeaseResponse).assign_context.context_id == sub.context_id
    for state in (ContextState.FAILED, ContextState.FAILED, ContextState.READY, ContextState.FAILED,
                  ContextState.FAILED):
        own_w.request("POST", f"/workers/{w}/library", LibraryEvent(context_id=sub.context_id, state=state))
    assert serve.client().request("GET", f"/workloads/{sub.workload_id}")["rows_failed"] == 0
    own_w.request("POST", f"/workers/{w}/library", failed)
    assert serve.client().request("GET", f"/workloads/{sub.workload_id}")["rows_failed"] == 8


@pytest.mark.parametrize("url", ["http://10.9.8.7:8000/blobs", "http://localhost:8000/", "http://[::1]:80/",
                                 "http://u:p@127.0.0.1:9/", "http://127.0.0.1:9/?x=1"])
def test_a_blob_server_elsewhere_than_the_worker_is_refused(serve: ServeProcess, url: str) -> None:
    pool = serve.worker_client()
    reg = WorkerRegistration(host="h", pid=1, blob_url=url, upload_slots=2)
    refused(lambda: pool.request("POST", "/workers", reg), 400, "peer_address")
    with db(serve) as conn:
        assert conn.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 0
    ok = pool.request("POST", "/workers", reg.model_copy(update={"blob_url": "http://127.0.0.1:9/"}))
    assert ok["worker_id"].startswith("w-")


def test_registrations_per_glidein_are_bounded(serve: ServeProcess) -> None:
    pool = serve.worker_client()
    for i in range(16):
        pool.request("POST", "/workers", WorkerRegistration(host="h", pid=i, glidein_id="9.0"))
    refused(lambda: pool.request("POST", "/workers", WorkerRegistration(host="h", pid=99, glidein_id="9.0")),
            409, "too_many_workers")
    pool.request("POST", "/workers", WorkerRegistration(host="h", pid=99, glidein_id="9.1"))
