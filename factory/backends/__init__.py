"""Glidein backends, one small class per batch system behind ``base.GlideinBackend``:
``local`` (subprocesses: the embedded default) and ``htcondor`` (the htcondor2 bindings).
``make_backend`` builds the one a factory config names; a backend's module is imported only
when it is used (the HTCondor bindings are an optional extra)."""
from __future__ import annotations

import importlib

from factory.backends.base import BackendError, GlideinBackend
from factory.config import FactoryConfig

BACKENDS = {"local": "factory.backends.local:LocalBackend",
            "htcondor": "factory.backends.htcondor:HTCondorBackend"}


def make_backend(config: FactoryConfig) -> GlideinBackend:
    try:
        module, cls = BACKENDS[config.backend].split(":")
    except KeyError:
        raise BackendError(f"unknown backend {config.backend!r}: one of {', '.join(BACKENDS)}") from None
    backend: type[GlideinBackend] = getattr(importlib.import_module(module), cls)
    return backend.from_config(config)
