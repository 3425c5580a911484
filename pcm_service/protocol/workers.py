"""The worker protocol: register, heartbeat, lease batches, report rows, retire."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from pcm_service.protocol.base import BlobURL, Chunk, Count, Ident, Message, Short, Strict
from pcm_service.protocol.states import ContextState, WorkerKind
from pcm_service.protocol.workloads import ChatMessage, ContextSpec, SamplingSettings

# Every field a worker sends is bounded: glidein hosts are not trusted (see README "Security").
MAX_HELD_BATCHES = 4096  # batches a heartbeat may list (a worker holds a few)
MAX_LEASED_BATCHES = 64  # batches one lease may ask for


class Resources(Strict):
    cpus: Count = 1
    memory_mb: Count = 0
    gpus: list[Short] = Field(default_factory=list, max_length=64)


class WorkerRegistration(Strict):
    host: Short
    pid: Count
    glidein_id: Optional[Ident] = None
    resources: Resources = Field(default_factory=Resources)
    # the worker's blob server, when it serves chunks to peers: on the address its requests come from
    blob_url: Optional[BlobURL] = None
    upload_slots: Count = Field(default=0, le=64)  # transfers its blob server serves at once
    # verified chunks already in its cache: a hint for placing it, never a source for others
    # until the service has seen it fetch them
    chunks: list[Chunk] = Field(default_factory=list, max_length=65536)
    kind: WorkerKind = Field(default=WorkerKind.AGENT, strict=False)
    environment: Ident = ""  # the digest of the packed environment it runs in ("": a venv or image)


class RegisterResponse(Strict):
    worker_id: str
    # this worker's own credential: every /workers/{worker_id}/... call carries it as its bearer
    # token (the pool token only registers); kept like a token, never logged
    worker_token: str = Field(repr=False)
    heartbeat_interval: float
    idle_timeout: float


class Heartbeat(Strict):
    context_id: Optional[Ident] = None
    context_state: ContextState = Field(default=ContextState.ABSENT, strict=False)
    inflight_batches: Count = 0
    draining: bool = False
    # Lease reconciliation: the batches the worker still holds, and the newest lease response it
    # has seen. A batch leased to it in a response it has seen but no longer held goes back to
    # the queue (e.g. a lease answered while the service crashed, a report lost for good).
    batches: list[Count] = Field(default_factory=list, max_length=MAX_HELD_BATCHES)
    lease_seq: Count = 0


class HeartbeatResponse(Strict):
    ok: bool = True
    retire: bool = False


class LibraryEvent(Strict):
    """A library process changed state; ``ready`` events count engine starts."""

    context_id: Ident
    state: ContextState = Field(strict=False)
    seconds: float = Field(default=0.0, ge=0, le=86400 * 7)
    error: Optional[Message] = None


class LeaseRequest(Strict):
    context_id: Optional[Ident] = None
    context_state: ContextState = Field(default=ContextState.ABSENT, strict=False)
    max_batches: Count = Field(default=2, le=MAX_LEASED_BATCHES)


class RowTask(Strict):
    idx: Count
    row_id: str
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None  # a chat row: rendered by the model's template
    sampling: Optional[SamplingSettings] = None  # the row's own; else the batch's


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


class TopLogprob(Strict):
    token: str
    logprob: float


class TokenLogprob(Strict):
    token: str
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)  # the most likely alternatives


class Choice(Strict):
    """One of a row's ``n`` completions."""

    text: str
    finish_reason: Optional[str] = None
    completion_tokens: Count = 0
    logprobs: Optional[list[TokenLogprob]] = None


class RowResult(Strict):
    """A row's result: the first choice in ``text``/``finish_reason``; every choice in
    ``choices`` when there are several or they carry logprobs."""

    idx: Count
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    prompt_tokens: Count = 0
    completion_tokens: Count = 0  # over all choices
    error: Optional[str] = None
    choices: Optional[list[Choice]] = None


class BatchReport(Strict):
    batch_id: Count
    results: list[RowResult] = Field(default_factory=list)
    returned: list[Count] = Field(default_factory=list)  # row idx handed back unfinished
    # row idx in flight when the library process died: counted; a row in flight at
    # ``poison_after`` crashes is poisoned (failed with an error, not retried)
    crashed: list[Count] = Field(default_factory=list)


class BatchReports(Strict):
    """Reports of several batches in one request (one transaction): what a worker's reporter
    coalesced while its previous request was on the way."""
    reports: list[BatchReport] = Field(min_length=1, max_length=1024)


class IdleReport(Strict):
    idle_seconds: float = Field(ge=0)


class RetireDecision(Strict):
    """The answer to an idle worker: go, or stay because the factory's minimum keeps it."""
    retire: bool
    reason: str


class ReportResponse(Strict):
    accepted: Count
    duplicates: Count
