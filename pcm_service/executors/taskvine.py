"""The TaskVine executor: the service runs a TaskVine ``Manager``; each context with work gets
a Library whose context function starts the engine once per library process (the weights a
cached, peer-transferable input), and each leased batch becomes one FunctionCall.

How it keeps the executor contract (executors/base.py): its own loop takes the leases, under
one worker record of kind ``vine_manager``; TaskVine, not PCM, decides which worker runs a
call and reruns the calls of a worker it lost, so a batch stays leased until its call answers.
Each answer is reported through the core like an agent's report (first result per row wins),
so exactly-once, ordering, output files and OpenAI batches work unchanged. A call that fails
(its library died) hands its rows back with a crash counted. Its workers' states are reported
from the manager's view of them (vine_pool: registered, heartbeated, retired).

A worker's answer is data, never code (vine_answers): the service reads the call's raw output
file, never ndcctools' ``task.output`` (which unpickles it). An answer that is not plain data
crashes its call and the worker's host is blocked, so the batch runs elsewhere. The library
checks the weights against PCM's manifest before it starts the engine; a library that refused
them makes the service drop every cached copy and fetch them again.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pcm_service.core import ServiceCore, UnknownWorker
from pcm_service.executors.base import Executor
from pcm_service.executors.vine_answers import CallAnswer, UntrustedAnswer, call_answer
from pcm_service.executors.vine_pool import VineWorkers
from pcm_service.protocol import (
    TASKVINE_PORT,
    BatchLease,
    BatchReport,
    ContextSpec,
    ContextState,
    ExecutorInfo,
    ExecutorKind,
    ExecutorStatus,
    Heartbeat,
    LeaseRequest,
    ModelManifest,
    TaskVineStatus,
    WorkerKind,
    WorkerRegistration,
)
from pcm_service.tokens import write_secret

log = logging.getLogger("pcm.taskvine")
SYNC_INTERVAL = 1.0  # seconds between updates of the pool's records from the manager


@dataclass(frozen=True)
class VineFunctions:
    """What runs on the workers (worker_image.vine_library, handed in by the CLI): pickled by
    reference, so the workers' Python must import PCM. Each returns its answer as JSON text."""

    load_engine: Callable[..., None]  # the Library's context: (context, engine, manifest JSON)
    run_batch: Callable[[str], str]  # one FunctionCall per batch
    run_batch_cold: Callable[..., str]  # a plain task: starts an engine for one batch


@dataclass(frozen=True)
class TaskVineSettings:
    port: int = TASKVINE_PORT  # 0: any free one
    project: Optional[str] = None  # the manager's project name (vine_worker -M, vine_status)
    calls_per_worker: int = 2  # calls kept submitted per worker: one running, one ready behind it
    engine: str = "vllm"
    ssl: Optional[tuple[Path, Path]] = None  # (key, certificate): the service's TLS files
    # False: no Library, a plain task per batch that starts its own engine (the seed papers'
    # baseline without context; bench/executors.py)
    context_library: bool = True


@dataclass
class Call:
    lease: BatchLease


def library_name(context_id: str) -> str:
    return f"pcm-{context_id}"


def library_resources(spec: ContextSpec, gpu_pool: bool) -> dict[str, int]:
    """What one engine asks of a worker. On a CPU pool nothing: the library takes the whole
    worker (vLLM's CPU engine uses every core it is given). With GPUs: the engine's GPUs
    (tensor × pipeline parallel) and at least the weights' size in memory; TaskVine gives the
    library the same share of the worker's cores, so a 4-GPU worker runs four 1-GPU engines."""
    if not gpu_pool:
        return {}
    gpus = spec.engine.tensor_parallel_size * int(spec.engine.extra.get("pipeline_parallel_size", 1))
    weights = sum(f.stat().st_size for f in Path(spec.model).rglob("*") if f.is_file())
    return {"gpus": gpus, "memory": weights // 2**20 + 1}


class TaskVineExecutor(Executor):
    """The service's TaskVine manager: its loop leases, TaskVine runs, its answers are reported;
    its workers' records follow the manager's view of them (vine_pool)."""

    kind = ExecutorKind.TASKVINE
    worker_kind = WorkerKind.VINE_WORKER

    def __init__(self, core: ServiceCore, password: str, functions: VineFunctions,
                 settings: TaskVineSettings = TaskVineSettings()) -> None:
        import ndcctools.taskvine as vine

        super().__init__(core)
        self.vine = vine
        self.settings = settings
        self.functions = functions
        run_dir = core.state_dir / "taskvine"
        run_dir.mkdir(exist_ok=True)
        self.password_file = run_dir / "password"  # the pool token, as TaskVine's password file
        write_secret(self.password_file, password)
        ssl = (str(settings.ssl[0]), str(settings.ssl[1])) if settings.ssl else None
        self.m = vine.Manager(port=settings.port, name=settings.project, ssl=ssl, run_info_path=str(run_dir))
        self.m.set_password_file(str(self.password_file))
        self.port = self.m.port
        self.pool = VineWorkers(core)
        self.calls: dict[int, Call] = {}
        self.libraries: dict[str, str] = {}  # context id → library name
        self.models: dict[str, Any] = {}  # model path → its TaskVine file
        self.specs: dict[str, ContextSpec] = {}  # context id → its spec, for a library reinstalled
        self.refused: set[tuple[str, int]] = set()  # (worker, library pid) that refused the weights
        self.views: list[dict[str, Any]] = []  # the manager's workers, as of the last sync
        self._next_sync = 0.0
        self.lease_seq = 0
        self.holder = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._status = ExecutorStatus(kind=self.kind, taskvine=TaskVineStatus(port=self.port,
                                                                              project=settings.project))
        self._thread = threading.Thread(target=self._run, name="pcm-taskvine", daemon=True)

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(kind=self.kind, port=self.port, project=self.settings.project,
                            ssl=self.settings.ssl is not None)

    def status(self) -> ExecutorStatus:
        """As of the loop's last sync with the manager (once a second)."""
        with self._lock:
            return self._status

    def describe(self) -> str:
        project = f", project {self.settings.project}" if self.settings.project else ""
        return (f"executor: TaskVine manager on port {self.port}{project} (workers: vine_worker --password"
                " POOL_TOKEN_FILE, or glideins running `pcm worker`)")

    def start(self) -> None:
        for old in self.core.live_workers(WorkerKind.VINE_MANAGER):  # a previous run's leases go back
            self.core.retire(old)
        self._register()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.holder:
            self.core.retire(self.holder)
        if not self._thread.is_alive():  # the manager's port, sockets and logs close with it
            self.m.__exit__(None, None, None)

    def _register(self) -> None:
        self.holder = self.core.register(WorkerRegistration(
            host=f"{socket.gethostname()}:{self.port}", pid=os.getpid(), kind=WorkerKind.VINE_MANAGER)).worker_id

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._cycle()
            except Exception:  # the manager must outlive any one bad cycle
                log.exception("TaskVine executor cycle failed")
                self._stop.wait(1.0)

    def _cycle(self) -> None:
        """Answers and new calls every time a call answers; the pool's records (workers,
        heartbeats, status) once a second: each is an SQLite write, and while this loop is away
        from ``m.wait`` the manager dispatches no call."""
        synced = time.monotonic() >= self._next_sync
        if synced:
            self._next_sync = time.monotonic() + SYNC_INTERVAL
            self.views = self.m.status("workers")
            loading = next(iter(self.libraries), None) if len(self.libraries) == 1 else None
            self.pool.sync(self.views, self._call_contexts(), loading)
            self._heartbeat()
            self._publish(self.views)
        self._submit(len(self.views), retire_libraries=synced)
        t = self.m.wait(1)  # whole seconds; returns as soon as a call answers
        while t is not None:
            self._answered(t)
            t = self.m.wait(0)

    def _call_contexts(self) -> dict[int, str]:
        return {tid: c.lease.context_id for tid, c in self.calls.items()}

    def _heartbeat(self) -> None:
        try:
            self.core.heartbeat(self.holder, Heartbeat(
                context_id=None, context_state=ContextState.READY, inflight_batches=len(self.calls),
                batches=[c.lease.batch_id for c in self.calls.values()], lease_seq=self.lease_seq))
        except UnknownWorker:  # declared lost (the loop stalled): its leases were requeued
            log.warning("the TaskVine manager's leases expired: cancelling its %d calls", len(self.calls))
            for tid in list(self.calls):
                self.m.cancel_by_task_id(tid)
            self.calls.clear()
            self._register()

    def _submit(self, workers: int, retire_libraries: bool = False) -> None:
        """Keep ``calls_per_worker`` calls per connected worker, leased from the context with
        the most queued batches, so no library waits for its next batch. None while no worker
        is connected: the batches stay queued (and counted as demand) in PCM."""
        target = self.settings.calls_per_worker * workers
        if len(self.calls) >= target and not retire_libraries:
            return
        work = self.core.contexts_with_work()
        queued = sorted(((n, ctx) for ctx, (_, n) in work.items() if n > 0), reverse=True)
        for _, ctx in queued:
            while len(self.calls) < target:
                resp = self.core.lease_batch(self.holder, LeaseRequest(
                    context_id=ctx, context_state=ContextState.READY, max_batches=1))
                self.lease_seq = max(self.lease_seq, resp.lease_seq)
                if not resp.batches:
                    break
                for lease in resp.batches:
                    self.calls[self.m.submit(self._task(work[ctx][0], lease))] = Call(lease=lease)
        if retire_libraries and work:  # another context's turn: its libraries give way
            for ctx in [c for c in self.libraries if c not in work]:
                self.m.remove_library(self.libraries.pop(ctx))

    def _task(self, spec: ContextSpec, lease: BatchLease) -> Any:
        if not self.settings.context_library:
            task = self.vine.PythonTask(self.functions.run_batch_cold, spec.model_dump_json(),
                                        lease.model_dump_json(), self.settings.engine,
                                        self._manifest(spec).model_dump_json())
            task.add_input(self._model(spec), "model")
            if not self._ask_engine_resources(task, spec):
                # a plain task that declares nothing is packed several to a worker: each would
                # start its own engine on the same cores. One per worker, as a library is.
                task.set_cores(min((int(v.get("cores_total", 1)) for v in self.views), default=1))
            return task
        lib = self.libraries.get(spec.context_id) or self._install(spec)
        return self.vine.FunctionCall(lib, "run_batch", lease.model_dump_json())

    def _model(self, spec: ContextSpec) -> Any:
        """The weights: cached on each worker, copied between workers by TaskVine."""
        if spec.model not in self.models:
            self.models[spec.model] = self.m.declare_file(spec.model, cache="worker", peer_transfer=True)
        return self.models[spec.model]

    def _manifest(self, spec: ContextSpec) -> ModelManifest:
        """PCM's manifest of the weights (sha256 per chunk): the library checks its copy against it."""
        try:
            return self.core.replicas.manifest(spec.model_digest)
        except KeyError:
            return self.core.replicas.register_model(spec.model)

    def _install(self, spec: ContextSpec) -> str:
        name = library_name(spec.context_id)
        args = [spec.model_dump_json(), self.settings.engine, self._manifest(spec).model_dump_json()]
        lib = self.m.create_library_from_functions(
            name, self.functions.run_batch, add_env=False, exec_mode="direct",
            library_context_info=[self.functions.load_engine, args, {}])
        lib.add_input(self._model(spec), "model")
        lib.set_function_slots(1)  # direct mode: one call at a time in the one engine
        gpus = self._ask_engine_resources(lib, spec)
        self.m.install_library(lib)
        self.libraries[spec.context_id] = name
        self.specs[spec.context_id] = spec
        log.info("TaskVine library %s installed for %s (%s)", name, spec.model,
                 "the engine's GPUs" if gpus else "whole workers")
        return name

    def _ask_engine_resources(self, task: Any, spec: ContextSpec) -> bool:
        """On a GPU pool, the engine's GPUs and memory (True); on a CPU pool nothing (False)."""
        resources = library_resources(spec, gpu_pool=any(int(v.get("gpus_total", 0)) > 0 for v in self.views))
        if "gpus" in resources:
            task.set_gpus(resources["gpus"])
            task.set_memory(resources["memory"])
        return "gpus" in resources

    def _answered(self, t: Any) -> None:
        call = self.calls.pop(t.id, None)
        if call is None:
            return
        lease = call.lease
        rec = self.pool.record_of(t.addrport or "")
        answer = self._read_answer(t, lease) if t.successful() else None
        if answer is None:  # the library died (or never started) under this call, or lied
            log.warning("call for batch %d failed on %s: %s", lease.batch_id, t.addrport, t.result)
            self.core.report(self.holder, BatchReport(batch_id=lease.batch_id,
                                                      crashed=[r.idx for r in lease.rows]))
            return
        self.pool.saw_library(t.addrport, answer.library.model_dump())
        if answer.library.refused:
            self._refetch(t.addrport or "", answer.library.pid or 0, lease.context_id, answer.library.refused)
        results = answer.results
        if results:
            self.core.report(rec.worker_id if rec else self.holder,
                             BatchReport(batch_id=lease.batch_id, results=results), leased_to=self.holder)
        answered = {r.idx for r in results}
        missing = [r.idx for r in lease.rows if r.idx not in answered]
        if missing:  # the engine failed to start: the rows wait for another library
            self.core.report(self.holder, BatchReport(batch_id=lease.batch_id, returned=missing))

    def _read_answer(self, t: Any, lease: BatchLease) -> Optional[CallAnswer]:
        """The call's output file as plain data (never ``t.output``, which unpickles it); None
        when there is none or it is untrusted, whose worker's host then gets no more calls."""
        try:
            raw = t.output_file.contents()
        except Exception as e:  # no output file: a failed call
            log.warning("call for batch %d on %s left no output: %s", lease.batch_id, t.addrport, e)
            return None
        try:
            return call_answer(raw, lease, envelope=self.settings.context_library)
        except UntrustedAnswer as e:
            self._distrust(t.addrport or "", f"batch {lease.batch_id}: {e}")
            return None

    def _distrust(self, addr: str, why: str) -> None:
        """A worker that answered with something other than plain data: its host is blocked in
        TaskVine (no call goes there again) and its PCM record retired."""
        rec = self.pool.record_of(addr)
        host = rec.view.get("hostname") if rec else None
        log.error("untrusted answer from TaskVine worker %s (%s): %s; blocking its host", addr, host, why)
        if host:
            self.m.block_host(str(host))
        self.pool.distrust(addr)

    def _refetch(self, addr: str, pid: int, ctx: str, why: str) -> None:
        """A library refused its copy of the weights (a poisoned cache or peer transfer): every
        cached copy is dropped and the library reinstalled, so the weights come again from the
        service. Once per refusing library process (each of its calls says so)."""
        if (addr, pid) in self.refused or ctx not in self.specs:
            return
        self.refused.add((addr, pid))
        spec = self.specs[ctx]
        log.error("TaskVine worker %s refused the weights of %s: %s; fetching them again", addr, spec.model, why)
        name = self.libraries.pop(ctx, None)
        if name:
            self.m.remove_library(name)
        if spec.model in self.models:
            self.m.prune_file(self.models[spec.model])
        self._install(spec)  # the calls waiting for this context run on it

    def _publish(self, views: list[dict[str, Any]]) -> None:
        stats = self.m.stats
        workers = self.pool.views(self._call_contexts())
        status = ExecutorStatus(
            kind=self.kind, workers_known=len(workers), workers_connected=len(views),
            workers_busy=sum(w.calls_running > 0 for w in workers), batches_in_flight=len(self.calls),
            taskvine=TaskVineStatus(
                port=self.port, project=self.settings.project, workers_connected=len(views),
                calls_waiting=stats.tasks_waiting, calls_running=stats.tasks_running,
                libraries_installed=sorted(self.libraries), workers=workers))
        with self._lock:
            self._status = status
