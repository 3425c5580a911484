"""Workloads: what a user submits (model, engine, sampling, rows) and how it stands."""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Optional

from annotated_types import Ge, Le
from pydantic import BeforeValidator, Field, field_validator, model_validator

from pcm_service.protocol.base import Count, FilePath, Int, Positive, Strict, integral
from pcm_service.protocol.states import BatchEndpoint, ChatRole, WorkloadState

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
TopLogprobs = Annotated[int, Ge(0), Le(MAX_LOGPROBS), BeforeValidator(integral)]


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


class StructuredOutput(Strict):
    """vLLM's structured outputs (``StructuredOutputsParams``): exactly one constraint."""

    json_schema: Optional[dict[str, Any]] = None  # OpenAI's response_format json_schema.schema
    json_object: bool = False  # OpenAI's response_format {"type": "json_object"}
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutput":
        given = [k for k, v in self.model_dump().items() if v not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of json_schema, json_object, regex, choice, grammar")
        return self


class SamplingSettings(Strict):
    """Arguments for ``vllm.SamplingParams``; ``temperature: 0`` is greedy. A workload's
    ``sampling`` is the default of its rows; a row may carry its own (an OpenAI line's body)."""

    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: Int = -1
    # None: until the context is full (OpenAI's chat default when a line sets no limit)
    max_tokens: Optional[Positive] = 16
    min_tokens: Count = 0
    seed: Optional[Int] = None
    stop: list[str] = Field(default_factory=list)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0)
    n: Positive = Field(default=1, le=128)  # choices per row
    logprobs: Optional[TopLogprobs] = None  # top alternatives per token
    structured: Optional[StructuredOutput] = None


class ChatMessage(Strict):
    """One message of a chat row; the model's own chat template renders the conversation."""

    role: ChatRole = Field(strict=False)
    content: str
    name: Optional[str] = None


class ContextSpec(Strict):
    """What a batch needs loaded before it can run: a model and an engine configuration."""

    model: FilePath  # absolute path of a Hugging Face-format model directory (the origin copy)
    model_digest: str = ""  # the digest of the model's manifest; the service sets it on submit
    engine: EngineSettings = Field(default_factory=EngineSettings)
    # the packed worker environment's digest when the service ships one (``pcm serve
    # --worker-env``), set on submit: a change of environment is a new context
    environment: str = ""

    @property
    def context_id(self) -> str:
        parts: dict[str, object] = {"model": self.model_digest, "engine": self.engine.model_dump()}
        if self.environment:
            parts["environment"] = self.environment
        blob = json.dumps(parts, sort_keys=True)
        return "ctx-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


class NamedModel(Strict):
    """A model served by name (``pcm model add``, or ``models:`` in the service config): what an
    OpenAI line's ``body.model`` or a submission's ``model`` selects."""

    name: str = Field(min_length=1, max_length=256)
    path: FilePath  # a model directory under one of the service's model roots
    engine: EngineSettings = Field(default_factory=EngineSettings)
    created: Optional[float] = None  # set by the service

    def context(self) -> ContextSpec:
        return ContextSpec(model=self.path, engine=self.engine)


class RowIn(Strict):
    """One row: a prompt or a chat conversation, and optionally its own sampling settings."""

    row_id: str
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(default=None, min_length=1)
    sampling: Optional[SamplingSettings] = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "RowIn":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class OpenAIOutput(Strict):
    """An OpenAI-format workload: results written as OpenAI Batch output and error lines."""

    endpoint: BatchEndpoint = Field(strict=False)
    error_output: FilePath  # the error file (failed and expired requests)
    model: Optional[str] = None  # the name responses carry (default: the registered model's)
    batch_id: Optional[str] = None  # the OpenAI batch it runs for, if any
    expires_at: Optional[float] = None  # end of the completion window (rows left: batch_expired)


NDJSON = "application/x-ndjson"  # a streamed submission's media type


class WorkloadHeader(Strict):
    """A workload but its rows: ``context`` names a model directory; ``model`` instead names a
    registered model. A streamed submission (NDJSON) is this on its first line, then one
    ``RowIn`` per line."""

    name: str = Field(min_length=1)
    context: Optional[ContextSpec] = None
    model: Optional[str] = Field(default=None, min_length=1)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    batch_size: Positive
    output: FilePath
    openai: Optional[OpenAIOutput] = None

    @model_validator(mode="after")
    def _context_or_model(self) -> "WorkloadHeader":
        if (self.context is None) == (self.model is None):
            raise ValueError("give exactly one of context (a model directory) or model (a registered name)")
        return self


class WorkloadSubmission(WorkloadHeader):
    """A workload and all its rows in one body."""

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


class WorkloadStatus(Strict):
    workload_id: str
    name: str
    state: WorkloadState = Field(strict=False)
    context_id: str
    model: Optional[str] = None  # the registered name it was submitted with
    rows_total: Count
    rows_done: Count
    rows_failed: Count
    rows_per_second: float
    output: str
    created_at: float
    finished_at: Optional[float]
