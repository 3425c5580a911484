"""Executors: who runs the batches the core leases. ``native`` (PCM's worker agents pull them
over HTTP; nothing runs in the service) or ``taskvine`` (the service's TaskVine manager turns
each leased batch into a FunctionCall of a per-context Library on TaskVine workers)."""
from __future__ import annotations

from pcm_service.executors.base import Executor, NativeExecutor

__all__ = ["Executor", "NativeExecutor"]
