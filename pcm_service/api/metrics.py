"""``GET /metrics``: the pool in Prometheus' text format, behind the metrics token or the API
token (Prometheus sends either as a bearer token: ``authorization: {credentials_file: ...}``).

What the service's records hold (rows per workload, workers and contexts by state, engine
starts and their time to ready, weight bytes by source, glideins per factory, demand and
limits) is read at each scrape, so it survives restarts and is never counted twice. Lease and
report latencies are observed as they happen, in this process."""
from __future__ import annotations

import time
from collections import Counter
from typing import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pcm_service.api.errors import AUTH
from pcm_service.core import ServiceCore
from pcm_service.executors import Executor
from pcm_service.protocol import ContextState, GlideinState, WorkerState

# an engine start is seconds (a small model on a GPU) to many minutes (a large one from a
# shared filesystem); a lease or a report is milliseconds
READY_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _histogram(name: str, doc: str, values: list[float], buckets: tuple[float, ...]) -> HistogramMetricFamily:
    cumulative, edges = [], [*buckets, float("inf")]
    for edge in edges:
        cumulative.append((str(edge) if edge != float("inf") else "+Inf", sum(v <= edge for v in values)))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=sum(values))


class PoolCollector(Collector):
    """Every series read from the service's records at scrape time."""

    def __init__(self, core: ServiceCore, executor: Executor) -> None:
        self.core = core
        self.executor = executor

    def collect(self) -> Iterator[Metric]:
        st = self.core.status()
        labels = ["workload", "name"]
        done = CounterMetricFamily("pcm_rows_completed", "Rows with a final result (text or error)", labels=labels)
        failed = CounterMetricFamily("pcm_rows_failed", "Rows whose final result is an error", labels=labels)
        total = GaugeMetricFamily("pcm_rows", "Rows in the workload", labels=labels)
        rate = GaugeMetricFamily("pcm_rows_per_second", "Rows completed per second since the workload"
                                 " was accepted (until it finished)", labels=labels)
        for wl in st.workloads:
            key = [wl.workload_id, wl.name]
            done.add_metric(key, wl.rows_done)
            failed.add_metric(key, wl.rows_failed)
            total.add_metric(key, wl.rows_total)
            rate.add_metric(key, wl.rows_per_second)
        yield from (done, failed, total, rate)

        workers = Counter(w.state for w in st.workers)
        g = GaugeMetricFamily("pcm_workers", "Live workers by state", labels=["state"])
        for state in (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING):
            g.add_metric([state.value], workers[state])
        yield g
        contexts = Counter(w.context_state for w in st.workers)
        g = GaugeMetricFamily("pcm_worker_contexts", "Live workers by the state of their context", labels=["state"])
        for cstate in ContextState:
            g.add_metric([cstate.value], contexts[cstate])
        yield g

        ex = self.executor.status()
        g = GaugeMetricFamily("pcm_executor_workers", "The executor's workers: known (live records),"
                              " connected, busy", labels=["executor", "state"])
        for name, n in (("known", ex.workers_known), ("connected", ex.workers_connected), ("busy", ex.workers_busy)):
            g.add_metric([ex.kind.value, name], n)
        yield g
        g = GaugeMetricFamily("pcm_executor_batches_in_flight", "Batches leased to the executor's workers"
                              " and not yet answered", labels=["executor"])
        g.add_metric([ex.kind.value], ex.batches_in_flight)
        yield g

        ready = self.core.engine_ready_seconds()
        yield CounterMetricFamily("pcm_engine_starts", "Engines started and ready (context loads)", value=len(ready))
        yield _histogram("pcm_engine_time_to_ready_seconds", "Seconds from a library's start to its engine"
                         " being ready", ready, READY_BUCKETS)

        c = CounterMetricFamily("pcm_weight_bytes", "Model weight bytes copied to workers, by source",
                                labels=["source"])
        c.add_metric(["origin"], st.transfers.origin_bytes)
        c.add_metric(["peer"], st.transfers.peer_bytes)
        yield c
        yield CounterMetricFamily("pcm_weight_transfer_failures", "Chunk transfers that failed",
                                  value=st.transfers.failures)

        g = GaugeMetricFamily("pcm_glideins", "Glideins by state, as each factory last reported them",
                              labels=["factory", "state"])
        for rep in self.core.factories.reports(time.time()):
            states = Counter(gl.state for gl in rep.glideins)
            for gstate in (GlideinState.IDLE, GlideinState.RUNNING, GlideinState.HELD):
                g.add_metric([rep.factory, gstate.value], states[gstate])
        yield g

        audited = CounterMetricFamily("pcm_audits", "Batches of a host run again by another host and compared",
                                      labels=["host"])
        disagreed = CounterMetricFamily("pcm_audit_disagreements", "Audits of a host's batches that disagreed",
                                        labels=["host"])
        for h in st.audits:
            audited.add_metric([h.host], h.audited)
            disagreed.add_metric([h.host], h.disagreements)
        yield from (audited, disagreed)
        yield GaugeMetricFamily("pcm_barred_hosts", "Hosts barred from leases after failed audits",
                                value=sum(h.barred for h in st.audits))

        d = st.demand
        yield GaugeMetricFamily("pcm_demand_workers", "Workers the demand model wants (after limits)",
                                value=d.workers_wanted)
        yield GaugeMetricFamily("pcm_demand_raw_workers", "Workers the work alone asks for", value=d.raw)
        yield GaugeMetricFamily("pcm_factory_min_workers", "The factory's minimum", value=d.limits.min_workers)
        yield GaugeMetricFamily("pcm_factory_max_workers", "The factory's maximum", value=d.limits.max_workers)
        yield GaugeMetricFamily("pcm_rows_left", "Rows not finished over all running workloads", value=d.rows_left)


class ServiceMetrics:
    """One registry per app (tests run many apps in one process): the pool's state and the
    hot calls' latencies."""

    def __init__(self, core: ServiceCore, executor: Executor) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(core, executor))
        self.lease_seconds = Histogram("pcm_lease_duration_seconds", "Seconds to answer a worker's lease"
                                       " (its transaction committed)", buckets=CALL_BUCKETS, registry=self.registry)
        self.report_seconds = Histogram("pcm_report_duration_seconds", "Seconds to record a worker's report"
                                        " (committed)", buckets=CALL_BUCKETS, registry=self.registry)


def metrics_router(metrics: ServiceMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}, **AUTH})
    def prometheus_metrics() -> Response:
        """The pool's metrics for Prometheus."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
