"""Spot-check audits (issue 28, item 7): a worker that returns made-up text for the batches it
leases is caught by another host running them again, its host is barred and its rows re-run."""
from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
from rich.console import Console

from pcm_service.cli.status_view import render_status
from pcm_service.client import ServiceClient
from pcm_service.core import ServiceConfig, ServiceCore
from pcm_service.core.trust import WorkerTrust
from pcm_service.protocol import (
    BatchLease,
    BatchReport,
    ContextSpec,
    ContextState,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RowIn,
    RowResult,
    ServiceStatus,
    SubmitResponse,
    WorkerRegistration,
    WorkloadState,
    WorkloadSubmission,
)
from tests.support.clock import FakeClock
from tests.support.models import fake_model
from tests.support.serve import ServeProcess


def honest(prompt: str) -> str:
    """What the honest worker's (deterministic, greedy) engine answers."""
    return f"answer to {prompt}"


def answer(lease: BatchLease, lie: bool) -> BatchReport:
    return BatchReport(batch_id=lease.batch_id, results=[
        RowResult(idx=r.idx, text=honest(r.prompt or "") + (" (made up)" if lie else ""), finish_reason="stop")
        for r in lease.rows])


def submission(tmp_path: Path, n: int = 4) -> WorkloadSubmission:
    return WorkloadSubmission(name="audited", context=ContextSpec(model=str(fake_model(tmp_path / "model"))),
                              batch_size=2, output=str(tmp_path / "out.jsonl"),
                              rows=[RowIn(row_id=f"r{i}", prompt=f"p{i}") for i in range(n)])


def outputs(tmp_path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]


class Worker:
    """A simulated worker over HTTP with its own credential: honest, or lying in every batch."""

    def __init__(self, serve: ServeProcess, host: str, lie: bool, ctx: str) -> None:
        self.id, self.own = serve.join(WorkerRegistration(host=host, pid=1))
        self.lie, self.ctx = lie, ctx
        assert self.own.request("POST", f"/workers/{self.id}/lease", LeaseRequest(max_batches=0),
                                LeaseResponse).assign_context.context_id == ctx
        self.own.request("POST", f"/workers/{self.id}/library", LibraryEvent(context_id=ctx, state=ContextState.READY))

    def run(self, n: int = 1) -> list[BatchLease]:
        """Lease up to n batches and answer them all; the leases it got."""
        got: LeaseResponse = self.own.request("POST", f"/workers/{self.id}/lease", LeaseRequest(
            context_id=self.ctx, context_state=ContextState.READY, max_batches=n), LeaseResponse)
        for b in got.batches:
            self.own.request("POST", f"/workers/{self.id}/report", answer(b, self.lie))
        return got.batches


def test_a_lying_host_is_caught_barred_and_its_rows_run_again(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path / "state", "--audit-fraction", "1.0", "--output-root", str(tmp_path)).start()
    try:
        client: ServiceClient = serve.client()
        sub = client.request("POST", "/workloads", submission(tmp_path), SubmitResponse)
        liar = Worker(serve, "liar-host", lie=True, ctx=sub.context_id)
        good = Worker(serve, "good-host", lie=False, ctx=sub.context_id)
        [first] = liar.run()  # made-up text for the first batch
        # the honest worker gets the second batch and the audit copy of the first (never the liar)
        second, audit = good.run(n=2)
        assert [r.prompt for r in audit.rows] == [r.prompt for r in first.rows]
        assert liar.run(n=4) == []  # barred: no more leases
        [again] = good.run(n=4)  # the liar's batch, run again
        assert again.rows == first.rows
        st = client.request("GET", f"/workloads/{sub.workload_id}")
        assert st["state"] == "completed"
        assert outputs(tmp_path) == [honest(f"p{i}") for i in range(4)]
        status = client.request("GET", "/status", None, ServiceStatus)
        hosts = {h.host: h for h in status.audits}
        assert hosts["liar-host"].barred and hosts["liar-host"].disagreements == 1
        assert not hosts.get("good-host") or not hosts["good-host"].barred
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(render_status(status))  # what `pcm status --wide` prints
        shown = console.export_text()
        assert "Audited hosts" in shown and "liar-host" in shown and "barred" in shown
        metrics = httpx.get(f"{serve.url}/metrics", headers={"authorization": f"Bearer {serve.metrics_token}"}).text
        assert 'pcm_audit_disagreements_total{host="liar-host"} 1.0' in metrics
        assert 'pcm_barred_hosts 1.0' in metrics
    finally:
        serve.stop()


def core_with_audits(tmp_path: Path) -> ServiceCore:
    return ServiceCore(tmp_path / "state", ServiceConfig(model_roots=(tmp_path,), trust=WorkerTrust(
        audit_fraction=1.0)), clock=FakeClock())


def ready(core: ServiceCore, host: str, ctx: str) -> str:
    wid = core.register(WorkerRegistration(host=host, pid=1)).worker_id
    core.library_event(wid, LibraryEvent(context_id=ctx, state=ContextState.READY, seconds=1.0))
    return wid


def run(core: ServiceCore, wid: str, ctx: str, n: int = 1, lie: bool = False) -> list[BatchLease]:
    leases = core.lease_batch(wid, LeaseRequest(context_id=ctx, context_state=ContextState.READY,
                                                max_batches=n)).batches
    for b in leases:
        core.report(wid, answer(b, lie))
    return leases


def test_agreeing_hosts_complete_after_their_audits(tmp_path: Path) -> None:
    core = core_with_audits(tmp_path)
    try:
        sub = core.submit(submission(tmp_path))
        a, b = ready(core, "a", sub.context_id), ready(core, "b", sub.context_id)
        run(core, a, sub.context_id, n=2)  # both batches; their audits are for b alone
        assert core.workload_status(sub.workload_id).state == WorkloadState.RUNNING  # not before its audits
        assert run(core, a, sub.context_id, n=4) == []
        assert len(run(core, b, sub.context_id, n=4)) == 2
        assert core.workload_status(sub.workload_id).state == WorkloadState.COMPLETED
        assert outputs(tmp_path) == [honest(f"p{i}") for i in range(4)]
        assert [(h.host, h.audited, h.disagreements, h.barred) for h in core.audit_hosts()] == [("a", 2, 0, False)]
    finally:
        core.close()


def test_without_audits_nothing_is_run_twice(tmp_path: Path) -> None:
    core = ServiceCore(tmp_path / "state", ServiceConfig(model_roots=(tmp_path,)), clock=FakeClock())
    try:
        sub = core.submit(submission(tmp_path))
        a, b = ready(core, "a", sub.context_id), ready(core, "b", sub.context_id)
        run(core, a, sub.context_id, n=2, lie=True)
        assert run(core, b, sub.context_id, n=4) == []
        assert core.workload_status(sub.workload_id).state == WorkloadState.COMPLETED and core.audit_hosts() == []
    finally:
        core.close()


def test_a_liar_auditing_an_honest_host_is_outvoted_by_a_third(tmp_path: Path) -> None:
    """A disagreement with a third host live goes to that host (BOINC's quorum): the liar who
    audited an honest host's batches is struck and barred, not the honest host."""
    core = core_with_audits(tmp_path)
    try:
        sub = core.submit(submission(tmp_path))
        a, liar, c = (ready(core, h, sub.context_id) for h in ("a", "liar", "c"))
        run(core, a, sub.context_id, n=2)  # both batches, honestly
        assert len(run(core, liar, sub.context_id, n=4, lie=True)) == 2  # it audits them, and lies
        assert run(core, liar, sub.context_id, n=4) == [] and run(core, a, sub.context_id, n=4) == []
        assert len(run(core, c, sub.context_id, n=4)) == 2  # the tie-breaks: only for the third host
        hosts = {h.host: (h.disagreements, h.barred) for h in core.audit_hosts()}
        assert hosts["liar"] == (2, True) and hosts["a"] == (0, False)
        assert core.workload_status(sub.workload_id).state == WorkloadState.COMPLETED
        assert outputs(tmp_path) == [honest(f"p{i}") for i in range(4)]
    finally:
        core.close()
