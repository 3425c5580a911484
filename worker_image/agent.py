"""The worker agent: what a glidein of the native executor runs (worker_image/glidein.py).

It registers with the service, loads its assigned context once in a library
process, keeps several batches in flight so the engine never idles between
them, reports rows as they finish, heartbeats, and retires when idle.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from pcm_service.client import ServiceClient, ServiceError, ServiceUnreachable
from pcm_service.protocol import (
    BatchReport,
    BatchReports,
    ContextSpec,
    ContextState,
    ErrorCode,
    FetchPlan,
    FetchRequest,
    Heartbeat,
    HeartbeatResponse,
    IdleReport,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RegisterResponse,
    RetireDecision,
    RowResult,
    WorkerRegistration,
)
from worker_image.blobserver import BlobServer, outward_address
from worker_image.chunkstore import ChunkStore
from worker_image.fetcher import FetchFailed, ModelFetcher
from worker_image.ledger import LeaseLedger, ReportQueue
from worker_image.library_handle import LibraryFailed, LibraryHandle
from worker_image.settings import DEFAULTS, PeerSettings, detect_resources

log = logging.getLogger("pcm.worker")
REGISTER_AGAIN = (ErrorCode.WORKER_UNKNOWN.value, ErrorCode.WORKER_LOST.value)
# a worker whose leases and reports show it alive still heartbeats every this many intervals, so
# the service reconciles the batches it holds (Kubernetes' node leases: renew cheaply, report fully seldom)
FULL_HEARTBEAT_EVERY = 5
MAX_EVENT_ERROR = 4000  # characters of an engine error sent to the service (it keeps at most 8192)


class WorkerAgent:
    def __init__(self, client: ServiceClient, work_dir: Optional[Path] = None,
                 glidein_id: Optional[str] = None, idle_timeout: Optional[float] = None,
                 target_rows: int = DEFAULTS.target_rows, max_batches: int = DEFAULTS.max_batches,
                 start_timeout: float = DEFAULTS.start_timeout, drain_timeout: float = DEFAULTS.drain_timeout,
                 engine: str = "vllm",
                 peers: Optional[PeerSettings] = None, token: Optional[str] = None,
                 lib_dir: Optional[Path] = None) -> None:
        """``lib_dir``: where the library's socket directories go (the glidein's own scratch)."""
        self.client = client
        self.lib_dir = lib_dir
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="pcm-worker-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.glidein_id = glidein_id or os.environ.get("PCM_GLIDEIN_ID")
        self.idle_timeout_override = idle_timeout
        self.target_rows = target_rows  # 0: from the engine's capacity once it is loaded
        self.max_batches = max_batches
        self.start_timeout = start_timeout
        self.drain_timeout = drain_timeout
        self.engine = engine
        self.peers = peers or PeerSettings()
        self.token = token
        self.store = ChunkStore(self.work_dir / "models")
        self.blobs: Optional[BlobServer] = None
        self.fetcher = ModelFetcher(client, self._plan, self.store, token=token,
                                    parallel=self.peers.fetch_parallel)
        self.context: Optional[ContextSpec] = None
        self.worker_id = ""
        self.reg: Optional[RegisterResponse] = None
        self.library: Optional[LibraryHandle] = None
        self.context_state = ContextState.ABSENT
        self.ledger = LeaseLedger()  # the batches held and the newest lease response taken in
        self._register_lock = threading.Lock()
        self._wake = threading.Event()
        self.stopping = threading.Event()
        self._exited = threading.Event()
        self.draining = False  # SIGTERM: finish or return in-flight rows within drain_timeout
        self.retiring = False  # the service asked us to go: finish in-flight batches, lease no more
        self._reports = ReportQueue()
        self._alive_shown_at = 0.0  # monotonic: the last lease or report the service answered
        self._beat: tuple[tuple[object, ...], float] = ((), 0.0)  # the last heartbeat: what it said, when

    # ----- service calls --------------------------------------------------------
    def _start_blob_server(self) -> None:
        p = self.peers
        if p.serve and self.blobs is None:
            host = p.host or outward_address(self.client.url)
            self.blobs = BlobServer(self.store.locate, self.token, host=host, port=p.port,
                                    upload_rate=p.upload_rate, upload_slots=p.upload_slots).start()

    def _register(self) -> None:
        self.reg = self.client.request("POST", "/workers", WorkerRegistration(
            host=socket.gethostname(), pid=os.getpid(), glidein_id=self.glidein_id,
            resources=detect_resources(), blob_url=(self.peers.url or self.blobs.url) if self.blobs else None,
            upload_slots=self.peers.upload_slots if self.blobs else 0,
            chunks=self.store.held(), environment=os.environ.get("PCM_ENV_DIGEST", "")), RegisterResponse)
        self.worker_id = self.reg.worker_id  # its credential stays in self.reg (repr hides it): never logged
        self.ledger.registered()
        log.info("registered as %s with %s", self.worker_id, self.client.url)

    def _call(self, method: str, path: str, body=None, response=None):  # type: ignore[no-untyped-def]
        """A worker call that re-registers if the service forgot us or declared us lost, but
        never once we are leaving (SIGTERM, told to retire, deregistered): a call still in
        flight then must not bring back a worker that is about to exit. A retired worker
        (410) never registers again."""
        stale = self.worker_id
        try:
            return self._own(method, f"/workers/{stale}{path}", body, response)
        except ServiceError as e:
            if e.code not in REGISTER_AGAIN or self.leaving:
                raise
            with self._register_lock:  # heartbeat and main loop may both notice
                if self.worker_id == stale:
                    log.warning("service no longer knows %s (%s); registering again", stale, e.code)
                    self._register()
            return self._own(method, f"/workers/{self.worker_id}{path}", body, response)

    def _own(self, method: str, path: str, body=None, response=None):  # type: ignore[no-untyped-def]
        """A call on this worker's own routes: with its own credential, not the pool token."""
        assert self.reg is not None
        return self.client.request(method, path, body, response, bearer=self.reg.worker_token)

    @property
    def leaving(self) -> bool:
        return self.stopping.is_set() or self.retiring or self._exited.is_set()

    def _plan(self, req: FetchRequest) -> FetchPlan:
        return self._call("POST", "/fetch", req, FetchPlan)

    def _library_event(self, state: ContextState, context: ContextSpec, seconds: float = 0.0,
                       error: Optional[str] = None) -> None:
        self.context_state = state
        event = LibraryEvent(context_id=context.context_id, state=state, seconds=seconds,
                             error=error[:MAX_EVENT_ERROR] if error else None)
        try:
            self._call("POST", "/library", event)
        except ServiceError as e:
            if e.code != ErrorCode.CONTEXT_NOT_ASSIGNED.value:
                raise
            log.warning("the service did not take our engine event: %s", e.detail)

    # ----- threads --------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        assert self.reg is not None
        every = self.reg.heartbeat_interval
        while not self._exited.wait(every):
            if self._heartbeat_due(every):
                self._send_heartbeat()

    def _state(self, inflight_batches: int) -> tuple[object, ...]:
        """What the service derives the worker's state from (busy, idle, draining, its context)."""
        ctx = self.context
        return (ctx.context_id if ctx else None, self.context_state, inflight_batches > 0,
                self.draining or self.retiring)

    def _heartbeat_due(self, every: float) -> bool:
        """A heartbeat when the worker's state changed, when no lease or report has shown the
        service it is alive within an interval, and every FULL_HEARTBEAT_EVERY intervals: a busy
        worker's leases and reports already keep it alive (the service counts them), so K busy
        workers do not add K/interval requests a second to the control plane."""
        now = time.monotonic()
        said, sent_at = self._beat
        return (self._state(self.ledger.holding().inflight_batches) != said
                or now - self._alive_shown_at >= every or now - sent_at >= FULL_HEARTBEAT_EVERY * every)

    def _send_heartbeat(self) -> None:
        held = self.ledger.holding()  # batches held and lease_seq from one moment: the service reconciles them
        n = held.inflight_batches
        state = self._state(n)
        try:
            ctx = self.context
            resp = self._call("POST", "/heartbeat", Heartbeat(
                context_id=ctx.context_id if ctx else None, context_state=self.context_state,
                inflight_batches=n, draining=self.draining or self.retiring, batches=held.batches,
                lease_seq=held.lease_seq), HeartbeatResponse)
        except ServiceError as e:
            log.warning("heartbeat failed: %s", e.detail)
            return
        self._beat = (state, time.monotonic())
        if resp.retire and not self.retiring:
            log.info("the service has more workers than it may keep: finishing %d batches, then exiting", n)
            self.retiring = True
            if n == 0:
                self.stopping.set()  # also cancels an engine start in progress
            self._wake.set()

    def _report_loop(self) -> None:
        while True:
            reports, queued, last = self._reports.take()
            if reports:  # every batch finished since the last request, in one request
                self._deliver(reports)
                for batch_id, n in queued.items():
                    self.ledger.delivered(batch_id, n)
            if last:
                return

    def _deliver(self, reports: list[BatchReport]) -> None:
        try:
            self._call("POST", "/reports", BatchReports(reports=reports))
            self._alive_shown_at = time.monotonic()
        except ServiceError as e:  # the service requeues them when our heartbeat omits them
            if e.code == ErrorCode.BATCH_NOT_LEASED.value and len(reports) > 1:
                # one batch is no longer ours (requeued while we were thought lost): the others are
                for rep in reports:
                    self._deliver([rep])
                return
            log.error("report for batches %s not delivered: %s", sorted(r.batch_id for r in reports), e.detail)

    def _rows_done(self, batch_id: int, rows: list[RowResult]) -> None:
        self._reports.put(self.ledger.finished(batch_id, rows))
        self._wake.set()

    # ----- context --------------------------------------------------------------
    def _fetch(self, context: ContextSpec) -> Optional[Path]:
        """The model's weights in the local cache, from peers and the origin."""
        self.context = context
        self._library_event(ContextState.FETCHING, context)
        t0 = time.monotonic()
        try:
            model_dir = self.fetcher.fetch(context.model_digest, self.stopping)
        except (FetchFailed, ServiceError) as e:
            if not self.stopping.is_set():
                self._library_event(ContextState.FAILED, context, error=f"fetching the model: {e}")
                log.error("could not fetch the model: %s", e)
            return None
        self._library_event(ContextState.CACHED, context, seconds=time.monotonic() - t0)
        log.info("model %s… cached in %s after %.1fs", context.model_digest[:12], model_dir,
                 time.monotonic() - t0)
        return model_dir

    def _load(self, context: ContextSpec) -> bool:
        model_dir = self._fetch(context)
        if model_dir is None:
            return False
        local = context.model_copy(update={"model": str(model_dir)})  # same context id
        log.info("loading context %s from %s", context.context_id, model_dir)
        self._library_event(ContextState.LOADING, context)
        try:
            lib, seconds = LibraryHandle.started(local, self.work_dir, self.engine, self.start_timeout,
                                                 self.stopping, sock_root=self.lib_dir)
        except LibraryFailed as e:
            if self.stopping.is_set():  # evicted while loading: not the engine's fault
                return False
            self._library_event(ContextState.FAILED, context, error=str(e))
            log.error("engine failed to start: %s", e)
            return False
        self.library = lib
        lib.receive(self._rows_done, self._wake.set)
        self._library_event(ContextState.READY, context, seconds=seconds)
        log.info("context %s ready after %.1fs", context.context_id, seconds)
        return True

    def _release_rows(self, crashed: bool = False) -> Optional[LibraryHandle]:
        """Detach the library and hand its unfinished rows back to the queue (the reporter
        sends them at once); the caller stops the library, which can take seconds. After a
        library crash the rows are reported as ``crashed``: the service counts them."""
        lib, self.library = self.library, None
        for rep in self.ledger.release(crashed):
            self._reports.put(rep)
        self.context_state = ContextState.ABSENT
        self.context = None
        return lib

    def _drop_library(self, crashed: bool = False) -> None:
        lib = self._release_rows(crashed)
        if lib is not None:
            lib.stop()

    # ----- main loop ------------------------------------------------------------
    def join(self) -> RegisterResponse:
        """Serve chunks to peers, register (announcing the chunks held), heartbeat."""
        self._start_blob_server()
        self._register()
        assert self.reg is not None
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="pcm-heartbeat").start()
        return self.reg

    def leave(self) -> None:
        """Stop heartbeating, deregister, stop serving chunks."""
        self._exited.set()
        try:
            self._own("DELETE", f"/workers/{self.worker_id}")
        except ServiceError as e:
            log.warning("could not deregister: %s", e.detail)
        if self.blobs is not None:
            self.blobs.stop()

    def run(self) -> int:
        reg = self.join()
        idle_timeout = self.idle_timeout_override or reg.idle_timeout
        reporter = threading.Thread(target=self._report_loop, name="pcm-reporter")
        reporter.start()
        rc = 0
        try:
            rc = self._loop(idle_timeout)
        except ServiceUnreachable as e:
            log.error("giving up: %s", e.detail)
            rc = 1
        except ServiceError as e:
            if e.code != ErrorCode.WORKER_RETIRED.value and not self.leaving:
                raise
            log.info("leaving: %s", e.detail)
        finally:
            self._finish(reporter)
        return rc

    def _loop(self, idle_timeout: float) -> int:
        last_work = time.monotonic()
        failures = 0
        while not self.stopping.is_set():
            lib = self.library
            if lib is not None and not lib.alive():
                log.error("library process died (code %s); requeueing its rows", lib.proc.returncode)
                self._drop_library(crashed=True)
                lib = None
            if self.retiring:
                if not self.ledger.busy:
                    log.info("retiring at the service's request")
                    return 0
            elif lib is None:
                resp = self._call("POST", "/lease", LeaseRequest(max_batches=0), LeaseResponse)
                if self.stopping.is_set():
                    break
                if resp.assign_context is not None:
                    if not self._load(resp.assign_context):
                        failures += 1
                        if failures >= 2:
                            return 1
                        continue
                    last_work = time.monotonic()
                    continue
            else:
                # by default twice what the engine runs at once: its scheduler stays full while
                # finished rows travel to the service and new batches come back
                target = self.target_rows or 2 * lib.capacity
                wanted = self.ledger.batches_wanted(target, self.max_batches)
                if wanted:
                    resp = self._call("POST", "/lease", LeaseRequest(
                        context_id=lib.context.context_id, context_state=ContextState.READY,
                        max_batches=wanted), LeaseResponse)
                    self._alive_shown_at = time.monotonic()
                    self.ledger.leased(resp.batches, resp.lease_seq)
                    for lease in resp.batches:
                        lib.send_batch(lease)
                    if resp.batches:
                        last_work = time.monotonic()
                        if len(resp.batches) == wanted:
                            continue
                    elif resp.assign_context is not None and not self.ledger.busy:
                        log.info("switching context to %s", resp.assign_context.context_id)
                        self._drop_library()
                        continue
            if self.ledger.busy:
                last_work = time.monotonic()
            elif time.monotonic() - last_work > idle_timeout:
                idle = time.monotonic() - last_work
                decision = self._call("POST", "/idle", IdleReport(idle_seconds=idle), RetireDecision)
                if decision.retire:
                    log.info("retiring: %s", decision.reason)
                    return 0
                log.info("idle for %.0fs but staying: %s", idle, decision.reason)
                last_work = time.monotonic()
            self._wake.wait(0.5)
            self._wake.clear()
        return 0

    def request_drain(self, *_args: object) -> None:
        """SIGTERM (HTCondor eviction): stop leasing, finish or return in-flight rows, exit."""
        self.draining = True
        self.stopping.set()
        self._wake.set()

    def _finish(self, reporter: threading.Thread) -> None:
        self.stopping.set()
        deadline = time.monotonic() + (self.drain_timeout if self.draining else 0)
        while self.ledger.busy and self.library is not None and self.library.alive() \
                and time.monotonic() < deadline:
            self._wake.wait(max(0.0, min(0.2, deadline - time.monotonic())))
            self._wake.clear()
        lib = self._release_rows()
        self._reports.put(None)
        reporter.join()  # rows reported and returned before the (slow) engine shutdown
        self.leave()
        if lib is not None:
            lib.stop(grace=5)
        log.info("worker %s exits", self.worker_id)
