"""The service core: workloads, batches, leases, results, workers, factories, demand.

``ServiceCore`` (``service.py``) is the facade, composed of parts that each get what they need
in their constructors (its docstring draws the graph) and listing every public method by the
part that owns it: ``workloads``, ``models`` (served by name), ``batches`` (OpenAI Files and
Batches), ``workers``, ``leasing`` (with ``placement`` and ``audit``), ``pool_ops`` (factories
and demand), ``overview`` (status and history). Beside them: ``results`` (final results,
requeues, the output file: functions of an open transaction), ``views`` (status records),
``demand`` (how many workers the work needs), ``factories`` (their limits and reports),
``errors`` (every error the core raises) and ``config`` (every default).
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
