"""Wire models shared by the service, the worker agent, the factory and the CLI.

Everything that crosses HTTP between PCM processes is one of these models, so the
service and the worker can never disagree about a field.
"""
from __future__ import annotations

import enum
import hashlib
import json
from functools import cached_property
from typing import Annotated, Any, Optional

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

API_PREFIX = "/v1"


# integers stay within what JSON carries exactly (and SQLite stores): larger ones are refused
INT_MAX = 2**53 - 1


def _integral(v: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; so do we (but never 3.5, "3" or true)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, Ge(-INT_MAX), Le(INT_MAX), BeforeValidator(_integral)]
Count = Annotated[int, Ge(0), Le(INT_MAX), BeforeValidator(_integral)]  # ids, indexes, sizes, counts
Positive = Annotated[int, Gt(0), Le(INT_MAX), BeforeValidator(_integral)]


class Strict(BaseModel):
    """Unknown fields and wrong types are refused: no bool or string for a number, no number
    for a string. Enum fields are marked ``strict=False`` so they take their values, as JSON
    carries them (in strict mode pydantic wants Enum instances from Python input)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)



class ErrorCode(str, enum.Enum):
    """Machine-readable reason of an error answer (``ErrorBody.code``)."""

    INVALID_REQUEST = "invalid_request"  # 422: the request does not match the API schema
    INVALID_VALUE = "invalid_value"  # 400: it does, but breaks a rule between fields (duplicate ids, max < min)
    MODEL_UNAVAILABLE = "model_unavailable"  # 400: the model path breaks the model policy or is unreadable
    MISSING_TOKEN = "missing_token"  # 401
    WRONG_TOKEN = "wrong_token"  # 403
    NOT_FOUND = "not_found"  # 404: no such route or object
    WORKER_UNKNOWN = "worker_unknown"  # 404: no worker by that id here: register again
    WORKER_LOST = "worker_lost"  # 404: the service declared it lost (no heartbeat): register again
    WORKER_RETIRED = "worker_retired"  # 410: it left (deregistered or retired): never register again
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405 (the Allow header lists the methods)
    REQUEST_TOO_LARGE = "request_too_large"  # 413
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"  # 416
    BUSY = "busy"  # 503: every upload slot is taken; ask another source


class ErrorItem(Strict):
    field: str
    message: str


class ErrorBody(Strict):
    """The one shape of every error answer: a code, a message, the field at fault if any."""

    code: ErrorCode = Field(strict=False)
    detail: str
    field: Optional[str] = None
    errors: list[ErrorItem] = Field(default_factory=list)  # 422: every field at fault


class ContextState(str, enum.Enum):
    """Where a worker stands with its context (DESIGN: absent → … → ready)."""

    ABSENT = "absent"
    FETCHING = "fetching"
    CACHED = "cached"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    RETIRED = "retired"
    LOST = "lost"


LIVE_WORKER_STATES = ("starting", "idle", "busy", "draining")  # as SQL values


class WorkloadState(str, enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"


class EngineSettings(Strict):
    """Arguments for vLLM's engine (``vllm.EngineArgs``); ``extra`` passes any other one."""

    dtype: str = "auto"
    max_model_len: Optional[Positive] = None
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enforce_eager: bool = False
    kv_cache_memory_bytes: Optional[Positive] = None
    tensor_parallel_size: Positive = 1
    seed: Int = 0
    max_num_seqs: Optional[Positive] = None
    extra: dict[str, Any] = Field(default_factory=dict)

    def engine_args(self) -> dict[str, Any]:
        args = self.model_dump(exclude={"extra"}, exclude_none=True)
        args.update(self.extra)
        return args


class SamplingSettings(Strict):
    """Arguments for ``vllm.SamplingParams``; ``temperature: 0`` is greedy."""

    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: Int = -1
    max_tokens: Positive = 16
    min_tokens: Count = 0
    seed: Optional[Int] = None
    stop: list[str] = Field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = Field(default=1.0, gt=0)


class ContextSpec(Strict):
    """What a batch needs loaded before it can run: a model and an engine configuration."""

    model: str  # absolute path of a Hugging Face-format model directory (the origin copy)
    model_digest: str = ""  # the digest of the model's manifest; the service sets it on submit
    engine: EngineSettings = Field(default_factory=EngineSettings)

    @property
    def context_id(self) -> str:
        blob = json.dumps(
            {"model": self.model_digest, "engine": self.engine.model_dump()}, sort_keys=True
        )
        return "ctx-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


class RowIn(Strict):
    row_id: str
    prompt: str


class WorkloadSubmission(Strict):
    name: str = Field(min_length=1)
    context: ContextSpec
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    batch_size: Positive
    output: str = Field(min_length=1)
    rows: list[RowIn] = Field(min_length=1)

    @field_validator("rows")
    @classmethod
    def _unique_ids(cls, rows: list[RowIn]) -> list[RowIn]:
        seen: set[str] = set()
        for i, row in enumerate(rows):
            if row.row_id in seen:
                raise ValueError(f"row {i}: duplicate row id {row.row_id!r}")
            seen.add(row.row_id)
        return rows


class SubmitResponse(Strict):
    workload_id: str
    context_id: str
    rows: Count
    batches: Count


class Resources(Strict):
    cpus: Count = 1
    memory_mb: Count = 0
    gpus: list[str] = Field(default_factory=list)


class WorkerRegistration(Strict):
    host: str
    pid: Count
    glidein_id: Optional[str] = None
    resources: Resources = Field(default_factory=Resources)
    blob_url: Optional[str] = None  # the worker's blob server, when it serves chunks to peers
    upload_slots: Count = 0  # transfers its blob server serves at once
    chunks: list[str] = Field(default_factory=list)  # verified chunks already in its cache


class RegisterResponse(Strict):
    worker_id: str
    heartbeat_interval: float
    idle_timeout: float


class Heartbeat(Strict):
    context_id: Optional[str] = None
    context_state: ContextState = Field(default=ContextState.ABSENT, strict=False)
    inflight_batches: Count = 0
    draining: bool = False
    # Lease reconciliation: the batches the worker still holds, and the newest lease response it
    # has seen. A batch leased to it in a response it has seen but no longer held goes back to
    # the queue (e.g. a lease answered while the service crashed, a report lost for good).
    batches: list[Count] = Field(default_factory=list)
    lease_seq: Count = 0


class HeartbeatResponse(Strict):
    ok: bool = True
    retire: bool = False


class LibraryEvent(Strict):
    """A library process changed state; ``ready`` events count engine starts."""

    context_id: str
    state: ContextState = Field(strict=False)
    seconds: float = 0.0
    error: Optional[str] = None


class LeaseRequest(Strict):
    context_id: Optional[str] = None
    context_state: ContextState = Field(default=ContextState.ABSENT, strict=False)
    max_batches: Count = 2


class RowTask(Strict):
    idx: Count
    row_id: str
    prompt: str


class BatchLease(Strict):
    batch_id: Count
    workload_id: str
    context_id: str
    sampling: SamplingSettings
    rows: list[RowTask]


class LeaseResponse(Strict):
    batches: list[BatchLease] = Field(default_factory=list)
    lease_seq: Count = 0  # echoed in heartbeats (see Heartbeat.lease_seq)
    # Set when the worker should (re)load: its current context has no work left.
    assign_context: Optional[ContextSpec] = None


class RowResult(Strict):
    idx: Count
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    error: Optional[str] = None


class BatchReport(Strict):
    batch_id: Count
    results: list[RowResult] = Field(default_factory=list)
    returned: list[Count] = Field(default_factory=list)  # row idx handed back unfinished
    # row idx in flight when the library process died: counted; a row in flight at
    # ``poison_after`` crashes is poisoned (failed with an error, not retried)
    crashed: list[Count] = Field(default_factory=list)


class IdleReport(Strict):
    idle_seconds: float = Field(ge=0)


class RetireDecision(Strict):
    """The answer to an idle worker: go, or stay because the factory's minimum keeps it."""
    retire: bool
    reason: str


class ReportResponse(Strict):
    accepted: Count
    duplicates: Count


class FactoryLimits(Strict):
    min_workers: Count = 0
    max_workers: Count = 1
    per_cycle: Positive = 4

    @model_validator(mode="after")
    def _ordered(self) -> "FactoryLimits":
        if self.max_workers < self.min_workers:
            raise ValueError(
                f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})"
            )
        return self


class Demand(Strict):
    workers_wanted: Count
    reason: str
    limits: FactoryLimits
    raw: Count = 0  # what the work alone asks for, before damping and limits
    rows_left: Count = 0
    batches_left: Count = 0
    rows_per_worker_second: Optional[float] = None  # measured; None before any worker ran rows
    time_to_ready: float = 0.0  # seconds from registration to a loaded engine (measured or assumed)
    ready_measured: bool = False


class GlideinState(str, enum.Enum):
    IDLE = "idle"  # queued in the batch system, not running yet
    RUNNING = "running"
    HELD = "held"
    EXITED = "exited"  # completed or removed; reported once, then forgotten


class Glidein(Strict):
    """One batch-system job running (or meant to run) one worker, as its backend sees it."""
    glidein_id: str  # HTCondor: "cluster.proc"
    state: GlideinState = Field(strict=False)
    host: Optional[str] = None
    gpus: list[str] = Field(default_factory=list)
    detail: str = ""  # hold reason, exit code, pid
    since: Optional[float] = None  # when it entered this state (unix time)


class FactoryDecision(Strict):
    at: float
    wanted: Count
    submit: Count = 0
    remove: list[str] = Field(default_factory=list)
    reason: str = ""


class FactoryReport(Strict):
    """What the factory last saw and did; it posts one every cycle."""
    factory: str
    backend: str
    at: float
    glideins: list[Glidein] = Field(default_factory=list)
    decisions: list[FactoryDecision] = Field(default_factory=list)


class FactoryView(Strict):
    limits: FactoryLimits
    config_limits: Optional[FactoryLimits] = None  # last limits a factory config file applied
    reports: list[FactoryReport] = Field(default_factory=list)


# ----- model weights: manifests, replicas, transfers ------------------------------------
ORIGIN = "origin"  # the source name of the service's own copy of a model


class ModelFile(Strict):
    path: str  # relative to the model directory
    size: Count
    chunks: list[str] = Field(default_factory=list)  # sha256 of each chunk_size piece, in order


class ModelManifest(Strict):
    """A model directory as content-addressed chunks: what a worker fetches and verifies."""

    chunk_size: Positive
    files: list[ModelFile]

    # derived once per manifest (they are read on every plan and every chunk received)
    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @cached_property
    def locations(self) -> dict[str, list[tuple[str, int, int]]]:
        """chunk → every (file, offset, length) holding it (identical pieces share a chunk)."""
        out: dict[str, list[tuple[str, int, int]]] = {}
        for f in self.files:
            for i, c in enumerate(f.chunks):
                off = i * self.chunk_size
                out.setdefault(c, []).append((f.path, off, min(self.chunk_size, f.size - off)))
        return out

    @cached_property
    def chunk_lengths(self) -> dict[str, int]:
        return {c: locs[0][2] for c, locs in self.locations.items()}


class ModelRegistration(Strict):
    path: str  # a model directory readable by the service: it becomes an origin copy


class TransferResult(Strict):
    chunk: str
    source: str  # a worker id or ORIGIN
    ok: bool
    bytes: Count = 0
    seconds: float = 0.0
    error: Optional[str] = None
    corrupt: bool = False  # the bytes did not match the chunk's hash
    busy: bool = False  # the source refused: all its upload slots were taken


class FetchRequest(Strict):
    manifest_digest: str
    results: list[TransferResult] = Field(default_factory=list)
    want: Count = 0  # how many more transfers the worker can run now
    wait: float = Field(default=0.0, ge=0, le=30)  # block this long for a free source


class ChunkAssignment(Strict):
    chunk: str
    length: Count
    source: str
    url: Optional[str] = None  # None: the origin, i.e. the service the worker talks to


class FetchProgress(Strict):
    manifest_digest: str
    chunks_held: Count
    chunks_total: Count
    bytes_held: Count
    bytes_total: Count
    sources: Count  # distinct sources of the transfers in flight


class FetchPlan(Strict):
    assignments: list[ChunkAssignment] = Field(default_factory=list)
    progress: FetchProgress


class TransferStats(Strict):
    origin_bytes: Count = 0
    peer_bytes: Count = 0
    transfers: Count = 0
    failures: Count = 0
    active: Count = 0


class WorkerStatus(Strict):
    worker_id: str
    host: str
    glidein_id: Optional[str]
    gpus: list[str] = Field(default_factory=list)
    state: WorkerState = Field(strict=False)
    context_id: Optional[str]
    context_state: ContextState = Field(strict=False)
    inflight_batches: Count
    rows_done: Count
    library_starts: Count
    idle_seconds: float
    last_heartbeat_age: float
    fetch: Optional[FetchProgress] = None  # while its context is fetching


class WorkloadStatus(Strict):
    workload_id: str
    name: str
    state: WorkloadState = Field(strict=False)
    context_id: str
    rows_total: Count
    rows_done: Count
    rows_failed: Count
    rows_per_second: float
    output: str
    created_at: float
    finished_at: Optional[float]


class ServiceStatus(Strict):
    workers: list[WorkerStatus]
    workloads: list[WorkloadStatus]
    demand: Demand
    glideins: list[Glidein] = Field(default_factory=list)  # from the factories' last reports
    transfers: TransferStats = Field(default_factory=TransferStats)
