"""The OpenAI Files and Batches objects PCM answers with (the official client parses these)."""
from __future__ import annotations

from typing import Any, Generic, Literal, Optional, TypeVar

from pydantic import BaseModel, Field

from pcm_service.protocol import BatchEndpoint, OpenAIBatchStatus

COMPLETION_WINDOWS = {"24h": 24 * 3600}  # the one window OpenAI offers
MAX_METADATA = 16


class OpenAIError(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIErrorBody(BaseModel):
    """The error answer of OpenAI's routes (PCM's own answer with ErrorBody)."""

    error: OpenAIError


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"  # deprecated by OpenAI, still sent
    status_details: Optional[str] = None
    expires_at: Optional[int] = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchErrorItem(BaseModel):
    code: str
    message: str
    param: Optional[str] = None
    line: Optional[int] = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem] = Field(default_factory=list)


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: OpenAIBatchStatus
    created_at: int
    model: Optional[str] = None
    errors: Optional[BatchErrors] = None
    output_file_id: Optional[str] = None
    error_file_id: Optional[str] = None
    in_progress_at: Optional[int] = None
    expires_at: Optional[int] = None
    finalizing_at: Optional[int] = None
    completed_at: Optional[int] = None
    failed_at: Optional[int] = None
    expired_at: Optional[int] = None
    cancelling_at: Optional[int] = None
    cancelled_at: Optional[int] = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: Optional[dict[str, str]] = None


class BatchCreate(BaseModel):
    """``POST /v1/batches``: checked here as OpenAI checks it (400 at once), the file later."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Optional[dict[str, Any]] = None
    output_expires_after: Optional[dict[str, Any]] = None

    def problem(self) -> Optional[tuple[str, str, str]]:
        """(code, param, message) of the first rule it breaks, or None."""
        if self.endpoint not in {e.value for e in BatchEndpoint}:
            return ("invalid_value", "endpoint", f"Invalid value for 'endpoint': {self.endpoint!r}; PCM serves"
                    f" {', '.join(e.value for e in BatchEndpoint)}.")
        if self.completion_window not in COMPLETION_WINDOWS:
            return ("invalid_value", "completion_window", f"Invalid value for 'completion_window':"
                    f" {self.completion_window!r}; supported: {', '.join(COMPLETION_WINDOWS)}.")
        md = self.metadata or {}
        if len(md) > MAX_METADATA:
            return ("invalid_value", "metadata", f"metadata has {len(md)} keys; at most {MAX_METADATA}.")
        for k, v in md.items():
            if not isinstance(v, str):
                return ("invalid_type", f"metadata.{k}", "metadata values must be strings.")
            if len(k) > 64 or len(v) > 512:
                return ("invalid_value", f"metadata.{k}", "metadata keys are at most 64 characters,"
                        " values at most 512.")
        return None


T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False

    @classmethod
    def of(cls, data: list[T], has_more: bool = False) -> "ListPage[T]":
        return cls(data=data, first_id=getattr(data[0], "id", None) if data else None,
                   last_id=getattr(data[-1], "id", None) if data else None, has_more=has_more)


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pcm"
