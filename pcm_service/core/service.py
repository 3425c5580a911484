"""The service core's facade: one object the HTTP layer, `pcm run`, the executors and the tests drive.

It owns all policy and keeps every state change inside one SQLite transaction. It is composed
of parts, one per concern, each given what it needs in its constructor (the store, the clock,
the config, and the parts or functions of other parts it calls; the graph has no cycle):

    Models      (models.py)     store, clock, replicas
    Workloads   (workloads.py)  store, clock, config, state_dir, replicas, Models
    OpenAIBatches (batches.py)  store, clock, state_dir, Models, Workloads
    Workers     (workers.py)    store, clock, config, replicas, factories, throughput
    Audits      (audit.py)      store, config.trust
    Placement   (placement.py)  clock, throughput, config.demand, replicas
    Leasing     (leasing.py)    store, clock, config, throughput, Placement, Audits
    Pool        (pool_ops.py)   store, clock, factories, throughput, ramp, Workers.retire
    Overview    (overview.py)   store, clock, replicas, factories, Workers.library_starts, Pool.demand

What runs inside another part's transaction is a plain function of the open connection:
``workers.live_worker`` (Leasing's lease) and ``results`` (row ends, requeues, reconciling a
heartbeat, settling cancels: Workers, Leasing, Audits and OpenAIBatches share them).

Below, every public method of the core, grouped by the part that owns it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from pcm_service.batchapi.objects import BatchErrorItem, BatchObject, FileObject
from pcm_service.core.audit import Audits
from pcm_service.core.batches import OpenAIBatches
from pcm_service.core.config import ServiceConfig
from pcm_service.core.demand import Ramp, ThroughputMeter
from pcm_service.core.factories import FactoryRegistry
from pcm_service.core.leasing import Leasing
from pcm_service.core.models import Models
from pcm_service.core.overview import BUCKETS, Overview
from pcm_service.core.placement import Placement
from pcm_service.core.pool_ops import Pool
from pcm_service.core.results import maybe_complete
from pcm_service.core.workers import Workers
from pcm_service.core.workloads import Workloads
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    BatchReport,
    ContextSpec,
    Demand,
    FactoryLimits,
    FactoryReport,
    FactoryView,
    FetchPlan,
    FetchRequest,
    Heartbeat,
    HeartbeatResponse,
    IdleReport,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    NamedModel,
    OpenAIOutput,
    RegisterResponse,
    ReportResponse,
    RetireDecision,
    RowIn,
    RunHistory,
    SamplingSettings,
    ServiceStatus,
    SubmitResponse,
    WorkerKind,
    WorkerRegistration,
    WorkerState,
    WorkloadHeader,
    WorkloadState,
    WorkloadStatus,
)
from pcm_service.protocol.status import HostAudit
from pcm_service.store import Store, in_list
from pcm_service.weights.modelpaths import ModelPolicy
from pcm_service.weights.replicas import ReplicaMap


def _now() -> float:
    return time.time()


class ServiceCore:
    def __init__(self, state_dir: str | Path, config: Optional[ServiceConfig] = None,
                 clock: Callable[[], float] = _now) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = cfg = config or ServiceConfig()
        self.clock = clock
        self.store = store = Store(self.state_dir / "pcm.sqlite3")
        store.set_clock(clock)
        self.factories = FactoryRegistry(store)
        models = ModelPolicy.of(cfg.model_roots, (self.state_dir, *cfg.secret_paths))
        self.replicas = ReplicaMap(store, cfg.transfers, clock, models)
        self.throughput = ThroughputMeter(cfg.demand)
        self.ramp = Ramp(cfg.demand)
        self._models = Models(store, clock, self.replicas)
        self._workloads = Workloads(store, clock, cfg, self.state_dir, self.replicas, self._models)
        self._openai = OpenAIBatches(store, clock, self.state_dir, self._models, self._workloads)
        self._workers = Workers(store, clock, cfg, self.replicas, self.factories, self.throughput)
        self._audits = Audits(store, cfg.trust)
        self._leasing = Leasing(store, clock, cfg, self.throughput,
                                Placement(clock, self.throughput, cfg.demand, self.replicas), self._audits)
        self._pool = Pool(store, clock, self.factories, self.throughput, self.ramp, self._workers.retire)
        self._overview = Overview(store, clock, self.replicas, self.factories, self._workers.library_starts,
                                  self._pool.demand)
        self._recover()

    def _recover(self) -> None:
        """Give known workers a full timeout to reconnect and finish interrupted completions."""
        now = self.clock()
        with self.store.transaction() as db:
            live, states = in_list(LIVE_WORKER_STATES)
            db.execute(f"UPDATE workers SET last_heartbeat=? WHERE state IN {live}", (now, *states))
            pending = [r["workload_id"] for r in db.execute(
                "SELECT workload_id FROM workloads WHERE state=? AND rows_done=rows_total",
                (WorkloadState.RUNNING.value,))]
            for wl in pending:
                maybe_complete(db, now, wl)  # not before its open audits
        self.discard_staged()  # submissions a crash interrupted were never acknowledged

    def close(self) -> None:
        """Close the store (its connections)."""
        self.store.close()

    # Workloads (workloads.py)

    def submit(self, sub: WorkloadHeader, rows: Optional[Iterable[RowIn]] = None) -> SubmitResponse:
        """Store a workload with ``rows`` (default: the submission's own); see Workloads.submit."""
        return self._workloads.submit(sub, rows)

    def checked_outputs(self, output: str, openai: Optional[OpenAIOutput]) -> tuple[str, Optional[OpenAIOutput]]:
        """The files a submission names, confined to the output roots. Raises OutputRefused."""
        return self._workloads.checked_outputs(output, openai)

    def context_of(self, model: Optional[str], context: Optional[ContextSpec]) -> ContextSpec:
        """The context a submission names (a model directory or a registered model's name)."""
        return self._workloads.context_of(model, context)

    def check_chat(self, context: ContextSpec, model: Optional[str]) -> None:
        """Raises NoChatTemplate if chat rows cannot run on the context's model."""
        self._workloads.check_chat(context, model)

    def insert_workload(self, name: str, context: ContextSpec, model: Optional[str], sampling: SamplingSettings,
                        batch_size: int, output: str, openai: Optional[OpenAIOutput],
                        rows: Iterable[RowIn]) -> SubmitResponse:
        """Store a checked workload as its rows arrive, then queue its batches."""
        return self._workloads.insert_workload(name, context, model, sampling, batch_size, output, openai, rows)

    def discard_staged(self, wl_id: Optional[str] = None) -> int:
        """Remove what an unfinished submission (or all of them) staged; how many batches."""
        return self._workloads.discard_staged(wl_id)

    def workload_status(self, wl_id: str) -> WorkloadStatus:
        """How one workload stands; raises UnknownWorkload."""
        return self._workloads.workload_status(wl_id)

    # Models by name (models.py)

    def add_model(self, model: NamedModel) -> NamedModel:
        """Register (or replace) a named model; raises ModelUnavailable."""
        return self._models.add_model(model)

    def list_models(self) -> list[NamedModel]:
        """Every named model, by name."""
        return self._models.list_models()

    def named_model(self, name: str) -> NamedModel:
        """The model registered by that name; raises UnknownModel."""
        return self._models.named_model(name)

    def has_model(self, name: str) -> bool:
        """Whether a model by that name is registered."""
        return self._models.has_model(name)

    # OpenAI Files and Batches (batches.py)

    @property
    def files_dir(self) -> Path:
        """Where uploads and batch results are kept (0700)."""
        return self._openai.files_dir

    def new_file_id(self) -> tuple[str, Path]:
        """A new File id and the path its upload is written to."""
        return self._openai.new_file_id()

    def add_file(self, file_id: str, path: Path, filename: str, purpose: str) -> FileObject:
        """Record an uploaded file, already written (and fsynced) at ``path``."""
        return self._openai.add_file(file_id, path, filename, purpose)

    def file(self, file_id: str) -> FileObject:
        """One File; raises UnknownObject."""
        return self._openai.file(file_id)

    def file_path(self, file_id: str) -> Path:
        """Where a File's content is; raises UnknownObject."""
        return self._openai.file_path(file_id)

    def files(self, purpose: Optional[str] = None) -> list[FileObject]:
        """Every File (of one purpose), oldest first."""
        return self._openai.files(purpose)

    def delete_file(self, file_id: str) -> None:
        """Forget a File and remove its content; raises UnknownObject."""
        self._openai.delete_file(file_id)

    def create_batch(self, input_file_id: str, endpoint: str, window: str,
                     metadata: Optional[dict[str, str]]) -> BatchObject:
        """A new batch, ``validating`` until ``validate_batch`` checks its file."""
        return self._openai.create_batch(input_file_id, endpoint, window, metadata)

    def fail_batch(self, batch_id: str, errors: list[BatchErrorItem]) -> None:
        """End a batch ``failed`` with these errors."""
        self._openai.fail_batch(batch_id, errors)

    def validate_batch(self, batch_id: str) -> None:
        """Check a ``validating`` batch's file; fail it or start its workload."""
        self._openai.validate_batch(batch_id)

    def validating_batches(self) -> list[str]:
        """Batches still to check (created before a restart)."""
        return self._openai.validating_batches()

    def batch(self, batch_id: str) -> BatchObject:
        """One batch as OpenAI shows it; raises UnknownObject."""
        return self._openai.batch(batch_id)

    def batches(self, after: Optional[str], limit: int) -> tuple[list[BatchObject], bool]:
        """A page of batches, newest first, and whether more follow."""
        return self._openai.batches(after, limit)

    def cancel_batch(self, batch_id: str) -> BatchObject:
        """Stop leasing a batch's rows; raises UnknownObject or Conflict."""
        return self._openai.cancel_batch(batch_id)

    def settle_workloads(self) -> None:
        """Housekeeping: finish cancellations whose batches came back, expire overdue workloads."""
        self._openai.settle_workloads()

    # Workers (workers.py)

    def register(self, reg: WorkerRegistration, client_host: Optional[str] = None) -> RegisterResponse:
        """A new worker and its own credential; raises Refused."""
        return self._workers.register(reg, client_host)

    def worker_token_matches(self, worker_id: str, token: str) -> Optional[bool]:
        """Whether ``token`` is the worker's credential; None for a worker never registered."""
        return self._workers.worker_token_matches(worker_id, token)

    def heartbeat(self, worker_id: str, hb: Heartbeat) -> HeartbeatResponse:
        """A worker's state; the answer says whether it is surplus. Raises UnknownWorker."""
        return self._workers.heartbeat(worker_id, hb)

    def idle(self, worker_id: str, rep: IdleReport) -> RetireDecision:
        """An idle worker asks to retire; the factory's minimum may keep it."""
        return self._workers.idle(worker_id, rep)

    def library_event(self, worker_id: str, ev: LibraryEvent, assigned_only: bool = False) -> None:
        """An engine event (``assigned_only``: only for the context it was assigned, else Refused)."""
        self._workers.library_event(worker_id, ev, assigned_only)

    def library_starts(self, worker_id: Optional[str] = None) -> dict[str, int]:
        """Engine starts per worker (or of one)."""
        return self._workers.library_starts(worker_id)

    def engine_ready_seconds(self) -> list[float]:
        """Each engine start's seconds to ready."""
        return self._workers.engine_ready_seconds()

    def retire(self, worker_id: str, state: WorkerState = WorkerState.RETIRED) -> int:
        """A worker left (or was lost): its unfinished batches are requeued; how many."""
        return self._workers.retire(worker_id, state)

    def live_workers(self, kind: WorkerKind) -> list[str]:
        """Ids of the live workers of one kind."""
        return self._workers.live_workers(kind)

    def reap(self) -> list[str]:
        """Declare workers without a recent heartbeat lost; returns them."""
        return self._workers.reap()

    def fetch_plan(self, worker_id: str, req: FetchRequest) -> FetchPlan:
        """Record finished chunk transfers, hand out sources for more."""
        return self._workers.fetch_plan(worker_id, req)

    # Leases and results (leasing.py, with placement.py and audit.py)

    def contexts_with_work(self) -> dict[str, tuple[ContextSpec, int]]:
        """Every context with batches queued or leased, and how many are queued."""
        return self._leasing.contexts_with_work()

    def lease_batch(self, worker_id: str, req: LeaseRequest) -> LeaseResponse:
        """Lease batches of the worker's loaded context, or tell it what to load."""
        return self._leasing.lease_batch(worker_id, req)

    def report(self, worker_id: str, *reports: BatchReport, leased_to: Optional[str] = None) -> ReportResponse:
        """Record row results of leased batches, in one transaction; raises UnknownBatch or Refused."""
        return self._leasing.report(worker_id, *reports, leased_to=leased_to)

    def wait_for_progress(self, timeout: float) -> None:
        """Block until some row result is committed (or ``timeout``)."""
        self._leasing.wait_for_progress(timeout)

    def audit_hosts(self) -> list[HostAudit]:
        """Per host: batches audited, disagreements, whether it is barred."""
        return self._audits.audit_hosts()

    # Factories and demand (pool_ops.py)

    def factory_limits(self) -> FactoryLimits:
        """The pool's limits (defaults if none were set)."""
        return self._pool.factory_limits()

    def set_factory_limits(self, limits: FactoryLimits, from_config: bool = False) -> FactoryLimits:
        """Set the pool's limits (``from_config``: a factory's config file's)."""
        return self._pool.set_factory_limits(limits, from_config)

    def factory_report(self, rep: FactoryReport) -> list[str]:
        """Store a factory's report; workers of exited glideins are lost at once (returned)."""
        return self._pool.factory_report(rep)

    def factory_view(self) -> FactoryView:
        """Limits and the factories' recent reports."""
        return self._pool.factory_view()

    def demand(self) -> Demand:
        """How many workers the work left needs, and why."""
        return self._pool.demand()

    # What the service reports (overview.py)

    def status(self, include_gone: bool = False) -> ServiceStatus:
        """Workers, workloads, demand, glideins, transfers, audits (`pcm status`)."""
        return self._overview.status(include_gone)

    def history(self, workload_id: Optional[str] = None, buckets: int = BUCKETS) -> RunHistory:
        """The run over time (`pcm report`), or one workload's span; raises UnknownWorkload."""
        return self._overview.history(workload_id, buckets)
