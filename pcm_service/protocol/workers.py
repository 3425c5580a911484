"""The worker protocol: register, heartbeat, lease batches, report rows, retire."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from pcm_service.protocol.base import Count, Strict
from pcm_service.protocol.states import ContextState, WorkerKind
from pcm_service.protocol.workloads import ChatMessage, ContextSpec, SamplingSettings


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
    kind: WorkerKind = Field(default=WorkerKind.AGENT, strict=False)
    environment: str = ""  # the digest of the packed environment it runs in ("": a venv or image)


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
    reports: list[BatchReport] = Field(min_length=1)


class IdleReport(Strict):
    idle_seconds: float = Field(ge=0)


class RetireDecision(Strict):
    """The answer to an idle worker: go, or stay because the factory's minimum keeps it."""
    retire: bool
    reason: str


class ReportResponse(Strict):
    accepted: Count
    duplicates: Count
