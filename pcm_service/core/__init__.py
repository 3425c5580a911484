"""The service core: workloads, batches, leases, results, workers, factories, demand.

``ServiceCore`` (``service.py``) is the facade; each module beside it holds one part of its
policy: ``workloads``, ``models`` (served by name), ``batches`` (OpenAI Files and Batches),
``workers``, ``leasing``, ``pool_ops`` (factories and demand), with
``results`` (final results, requeues, the output file), ``views`` (status records),
``demand`` (how many workers the work needs), ``factories`` (their limits and reports) and
``config`` (every default).
"""
from __future__ import annotations

from pcm_service.core.config import ServiceConfig
from pcm_service.core.errors import (
    Conflict,
    CoreError,
    NoChatTemplate,
    OutputRefused,
    Refused,
    UnknownBatch,
    UnknownModel,
    UnknownObject,
    UnknownWorker,
    UnknownWorkload,
)
from pcm_service.core.service import ServiceCore

__all__ = ["Conflict", "CoreError", "NoChatTemplate", "OutputRefused", "Refused", "ServiceConfig", "ServiceCore",
           "UnknownBatch", "UnknownModel", "UnknownObject", "UnknownWorker", "UnknownWorkload"]
