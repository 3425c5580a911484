"""A pool to look at: two workloads, three workers speaking the worker protocol over HTTP (one
busy with rows done, one loading its engine, one with a failed engine) and a factory report
with their glideins and one held glidein. For the tests of what `pcm status` and the status
page show; no engine runs."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pcm_service.protocol import (
    BatchReport,
    BatchReports,
    ContextSpec,
    ContextState,
    FactoryReport,
    Glidein,
    GlideinState,
    Heartbeat,
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

HELD_REASON = "Error from slot1@node-4: memory usage exceeded request_memory"


@dataclass
class Pool:
    workloads: list[SubmitResponse]
    workers: list[str]
    glideins: list[Glidein]


def watched_pool(serve: ServeProcess, tmp_path: Path) -> Pool:
    client = serve.client()
    model = str(fake_model(tmp_path / "model"))
    subs = [client.request("POST", "/workloads", WorkloadSubmission(
        name=name, context=ContextSpec(model=model), batch_size=10, output=str(tmp_path / f"{name}.jsonl"),
        rows=[RowIn(row_id=str(i), prompt=f"claim {i}") for i in range(n)]), SubmitResponse)
        for name, n in (("fact-check", 2000), ("summaries", 1500))]
    glideins = [Glidein(glidein_id=f"1207.{i}", state=GlideinState.RUNNING, host=f"node-{i}.pool.example.org",
                        since=time.time() - 300) for i in range(3)]
    glideins.append(Glidein(glidein_id="1207.3", state=GlideinState.HELD, detail=HELD_REASON,
                            since=time.time() - 120))
    joined = [serve.join(WorkerRegistration(
        host=f"node-{i}.pool.example.org", pid=100 + i, glidein_id=f"1207.{i}")) for i in range(3)]
    workers = [wid for wid, _ in joined]
    ctx = subs[0].context_id
    states = (ContextState.READY, ContextState.LOADING, ContextState.FAILED)
    for (wid, own), state in zip(joined, states, strict=True):
        assert own.request("POST", f"/workers/{wid}/lease", LeaseRequest(max_batches=0),
                           LeaseResponse).assign_context.context_id == ctx
        if state != ContextState.LOADING:
            own.request("POST", f"/workers/{wid}/library", LibraryEvent(
                context_id=ctx, state=state, seconds=31.5, error="CUDA out of memory" if state == ContextState.FAILED
                else None))
        own.request("POST", f"/workers/{wid}/heartbeat", Heartbeat(context_id=ctx, context_state=state))
    busy, agent = joined[0]
    for _ in range(3):
        lease: LeaseResponse = agent.request("POST", f"/workers/{busy}/lease", LeaseRequest(
            context_id=ctx, context_state=ContextState.READY, max_batches=4), LeaseResponse)
        agent.request("POST", f"/workers/{busy}/reports", BatchReports(reports=[BatchReport(
            batch_id=b.batch_id, results=[RowResult(idx=r.idx, text="true", finish_reason="stop") for r in b.rows])
            for b in lease.batches]))
    held: LeaseResponse = agent.request("POST", f"/workers/{busy}/lease", LeaseRequest(
        context_id=ctx, context_state=ContextState.READY, max_batches=1), LeaseResponse)
    agent.request("POST", f"/workers/{busy}/heartbeat", Heartbeat(
        context_id=ctx, context_state=ContextState.READY, inflight_batches=1, lease_seq=held.lease_seq,
        batches=[b.batch_id for b in held.batches]))
    client.request("POST", "/factory/report", FactoryReport(factory="condor", backend="htcondor", at=time.time(),
                                                             glideins=glideins))
    return Pool(subs, workers, glideins)
