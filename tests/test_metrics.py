"""`GET /metrics` on a real `pcm serve`: the series Prometheus scrapes, from the service's
records and its hot calls, behind the metrics token (read-only) or the API token."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

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
from tests.support.serve import ServeProcess, free_port


def scrape(serve: ServeProcess, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{serve.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_show_rows_workers_engines_latencies_glideins_and_demand(serve: ServeProcess, tmp_path: Path) -> None:
    client = serve.client()
    sub: SubmitResponse = client.request("POST", "/workloads", WorkloadSubmission(
        name="claims", context=ContextSpec(model=str(fake_model(tmp_path / "m"))), batch_size=5,
        output=str(tmp_path / "out.jsonl"), rows=[RowIn(row_id=str(i), prompt=f"p{i}") for i in range(12)]),
        SubmitResponse)
    wid, worker = serve.join(WorkerRegistration(host="h", pid=1))
    worker.request("POST", f"/workers/{wid}/lease", LeaseRequest(max_batches=0))  # told what to load
    worker.request("POST", f"/workers/{wid}/library",
                   LibraryEvent(context_id=sub.context_id, state=ContextState.READY, seconds=42.0))
    lease: LeaseResponse = worker.request("POST", f"/workers/{wid}/lease", LeaseRequest(
        context_id=sub.context_id, context_state=ContextState.READY, max_batches=1), LeaseResponse)
    (batch,) = lease.batches
    worker.request("POST", f"/workers/{wid}/reports", BatchReports(reports=[BatchReport(
        batch_id=batch.batch_id, results=[RowResult(idx=r.idx, text="t", finish_reason="stop") for r in batch.rows[1:]]
        + [RowResult(idx=batch.rows[0].idx, error="too long")])]))
    worker.request("POST", f"/workers/{wid}/heartbeat", Heartbeat(
        context_id=sub.context_id, context_state=ContextState.READY, inflight_batches=1, lease_seq=lease.lease_seq))
    glideins = [Glidein(glidein_id="7.0", state=GlideinState.HELD),
                Glidein(glidein_id="7.1", state=GlideinState.RUNNING)]
    client.request("POST", "/factory/report", FactoryReport(factory="condor-a", backend="htcondor", at=time.time(),
                                                             glideins=glideins))

    m = scrape(serve, serve.metrics_token)
    wl = (("name", "claims"), ("workload", sub.workload_id))
    assert m[("pcm_rows_completed_total", wl)] == 5
    assert m[("pcm_rows_failed_total", wl)] == 1
    assert m[("pcm_rows", wl)] == 12
    assert m[("pcm_rows_per_second", wl)] > 0
    assert m[("pcm_workers", (("state", "busy"),))] == 1
    assert m[("pcm_workers", (("state", "idle"),))] == 0
    assert m[("pcm_worker_contexts", (("state", "ready"),))] == 1
    assert m[("pcm_engine_starts_total", ())] == 1
    assert m[("pcm_engine_time_to_ready_seconds_count", ())] == 1
    assert m[("pcm_engine_time_to_ready_seconds_sum", ())] == 42.0
    assert m[("pcm_engine_time_to_ready_seconds_bucket", (("le", "30.0"),))] == 0
    assert m[("pcm_engine_time_to_ready_seconds_bucket", (("le", "60.0"),))] == 1
    assert m[("pcm_lease_duration_seconds_count", ())] == 2  # told what to load, then a batch
    assert m[("pcm_report_duration_seconds_count", ())] == 1
    assert m[("pcm_weight_bytes_total", (("source", "origin"),))] == 0
    assert ("pcm_weight_bytes_total", (("source", "peer"),)) in m
    assert m[("pcm_glideins", (("factory", "condor-a"), ("state", "held")))] == 1
    assert m[("pcm_glideins", (("factory", "condor-a"), ("state", "running")))] == 1
    assert m[("pcm_demand_workers", ())] >= 0 and ("pcm_factory_max_workers", ()) in m
    assert m[("pcm_rows_left", ())] == 12 - 5
    assert scrape(serve, serve.api_token)[("pcm_rows", wl)] == 12  # the API token reads it too


def test_metrics_need_a_token_and_the_metrics_token_reads_nothing_else(serve: ServeProcess) -> None:
    url = f"{serve.url}/metrics"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {serve.pool_token}"}, timeout=30).status_code == 403
    read_only = {"Authorization": f"Bearer {serve.metrics_token}"}
    assert httpx.get(f"{serve.url}/v1/pcm/status", headers=read_only, timeout=30).status_code == 403
    assert httpx.post(f"{serve.url}/v1/pcm/workers", headers=read_only, json={"host": "h", "pid": 1},
                      timeout=30).status_code == 403
    assert len({serve.metrics_token, serve.api_token, serve.pool_token}) == 3


def test_the_factory_serves_its_cycle_metrics_behind_the_same_tokens(serve: ServeProcess, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PCM_API_TOKEN_FILE": str(serve.api_token_file),
           "PCM_POOL_TOKEN_FILE": str(serve.pool_token_file),
           "PCM_METRICS_TOKEN_FILE": str(serve.state_dir / "metrics.token")}
    fac = subprocess.Popen([sys.executable, "-m", "pcm_service.cli", "factory", "run", "--service", serve.url,
                            "--backend", "local", "--max", "0", "--interval", "0.2", "--metrics-port", str(port)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert fac.stdout is not None
        said = []
        for line in fac.stdout:  # the factory says where its metrics are once they are served
            said.append(line)
            if f"factory metrics on http://127.0.0.1:{port}/metrics" in line:
                break
        else:
            raise AssertionError(f"the factory exited ({fac.wait()}) without serving metrics: {''.join(said)}")
        assert httpx.get(url, timeout=30).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {serve.pool_token}"}, timeout=30).status_code == 403
        samples: dict[str, float] = {}
        for token in (serve.metrics_token, serve.api_token):
            r = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert r.status_code == 200, r.text
            samples = {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
                       if s.labels.get("state", "held") == "held"}
        assert {"pcm_factory_cycles_total", "pcm_factory_cycle_duration_seconds_count",
                "pcm_factory_glideins_submitted_total", "pcm_factory_glideins_removed_total",
                "pcm_factory_demand_workers", "pcm_factory_glideins"} <= set(samples)
        assert samples["pcm_factory_glideins_submitted_total"] == 0  # --max 0
    finally:
        fac.terminate()
        fac.wait(30)
