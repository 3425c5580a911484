"""Workloads: what a user submits (model, engine, sampling, rows) and how it stands."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from pydantic import Field, field_validator

from pcm_service.protocol.base import Count, Int, Positive, Strict
from pcm_service.protocol.states import WorkloadState


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
