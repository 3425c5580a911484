"""The service core: workloads, batches, leases, results, workers, factories, demand.

``ServiceCore`` (``service.py``) is the facade; each module beside it holds one part of its
policy: ``workloads``, ``models`` (served by name), ``batches`` (OpenAI Files and Batches),
``workers``, ``leasing``, ``pool_ops`` (factories and demand), with
``results`` (final results, requeues, the output file), ``views`` (status records),
``demand`` (how many workers the work needs), ``factories`` (their limits and reports) and
``config`` (every default).
"""
from __future__ import annotations

from pcm_service.core.base import Conflict, NoChatTemplate, UnknownModel, UnknownWorker, UnknownWorkload
from pcm_service.core.batches import UnknownObject
from pcm_service.core.config import ServiceConfig
from pcm_service.core.service import ServiceCore
from pcm_service.core.trust import Refused

__all__ = ["Conflict", "NoChatTemplate", "Refused", "ServiceConfig", "ServiceCore", "UnknownModel", "UnknownObject",
           "UnknownWorker", "UnknownWorkload"]
