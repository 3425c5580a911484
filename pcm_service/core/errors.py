"""Every error the service core raises on purpose: what a caller asked for that the core will
not or cannot do, nothing changed. Each says what is at fault in its own attributes, so the HTTP
layer words its answer from one table (``pcm_service/api/errors.py``) and in-process callers
(``pcm run``, the executors) catch the same types."""
from __future__ import annotations

from typing import Optional

from pcm_service.protocol import ErrorCode, WorkerState


class CoreError(Exception):
    """The base of the core's own errors (each is also the LookupError or ValueError it is)."""


class UnknownWorker(CoreError, LookupError):
    """No live worker by that id. ``state`` says why: None (never registered here), LOST (the
    service gave up on it: it may register again) or RETIRED (it left: it must not come back)."""

    def __init__(self, worker_id: str, state: Optional[WorkerState] = None) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.state = state


class UnknownWorkload(CoreError, LookupError):
    """No workload by that id."""

    def __init__(self, workload_id: str) -> None:
        super().__init__(workload_id)
        self.workload_id = workload_id


class UnknownModel(CoreError, LookupError):
    """No model registered by that name (``pcm model add``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class UnknownObject(CoreError, LookupError):
    """No OpenAI File or Batch by that id (the message is OpenAI's wording)."""


class UnknownBatch(CoreError, LookupError):
    """A report for a batch the service never made."""

    def __init__(self, batch_id: int) -> None:
        super().__init__(f"unknown batch {batch_id}")
        self.batch_id = batch_id


class NoChatTemplate(CoreError, ValueError):
    """Chat rows for a model whose tokenizer has no chat template."""


class Conflict(CoreError, ValueError):
    """The request does not fit the object's state (e.g. cancelling a completed batch)."""


class OutputRefused(CoreError, ValueError):
    """A workload's output path the service will not write (``field``: ``output`` or
    ``openai.error_output``): outside every output root, inside the state directory, a secret."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


class Refused(CoreError, ValueError):
    """A worker's call that the service will not carry out because it is not that worker's to
    make (another worker's batch, a context it was not given, a blob server elsewhere): nothing
    changed. ``code`` says which rule; the HTTP layer picks the status from it."""

    def __init__(self, code: ErrorCode, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.code, self.field = code, field
