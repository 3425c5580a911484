"""The factory's own metrics for Prometheus: its cycles (count, duration, failures), what it
submitted, removed and evicted, and the glideins it saw, served on ``--metrics-port`` behind
the same tokens as the service's ``/metrics`` (the metrics token or the API token)."""
from __future__ import annotations

import threading
from collections import Counter as Tally
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from factory.backends.base import Glidein, GlideinState
from pcm_service.tokens import check_bearer

CYCLE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class FactoryMetrics:
    def __init__(self, factory: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r, lab = self.registry, ["factory"]
        self.cycles = Counter("pcm_factory_cycles", "Factory cycles run", lab, registry=r).labels(factory)
        failed = Counter("pcm_factory_cycle_failures", "Factory cycles skipped, by what failed",
                         ["factory", "cause"], registry=r)
        self.service_failures = failed.labels(factory, "service")
        self.backend_failures = failed.labels(factory, "backend")
        self.cycle_seconds = Histogram("pcm_factory_cycle_duration_seconds", "Seconds one factory cycle took",
                                       lab, buckets=CYCLE_BUCKETS, registry=r).labels(factory)
        self.submitted = Counter("pcm_factory_glideins_submitted", "Glideins submitted", lab,
                                 registry=r).labels(factory)
        self.removed = Counter("pcm_factory_glideins_removed", "Glideins removed (surplus, idle, held too long)",
                               lab, registry=r).labels(factory)
        self.evicted = Counter("pcm_factory_glideins_evicted", "Glideins evicted by the eviction drill",
                               lab, registry=r).labels(factory)
        self._glideins = Gauge("pcm_factory_glideins", "Glideins in the batch system by state, at the last cycle",
                               ["factory", "state"], registry=r)
        self.wanted = Gauge("pcm_factory_demand_workers", "Workers the service's demand asked for at the last"
                            " cycle", lab, registry=r).labels(factory)
        self.factory = factory

    def saw(self, glideins: list[Glidein]) -> None:
        states = Tally(g.state for g in glideins)
        for state in (GlideinState.IDLE, GlideinState.RUNNING, GlideinState.HELD):
            self._glideins.labels(self.factory, state.value).set(states[state])


def serve_metrics(metrics: FactoryMetrics, host: str, port: int, tokens: list[str]) -> ThreadingHTTPServer:
    """``GET /metrics`` on host:port in a daemon thread; a scrape presents one of ``tokens``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                return self._answer(404, b"only /metrics here\n")
            refusal: Optional[tuple[int, str]] = None
            for token in tokens:
                refusal = check_bearer(self.headers.get("Authorization"), token, "metrics token or API token")
                if refusal is None:
                    return self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            assert refusal is not None
            self._answer(refusal[0], (refusal[1] + "\n").encode(), extra={"WWW-Authenticate": "Bearer"})

        def _answer(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                    extra: Optional[dict[str, str]] = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
            pass

    if not tokens:
        raise ValueError("the factory's metrics need a token to check")
    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="pcm-factory-metrics", daemon=True).start()
    return server
