"""TaskVine for the tests that need it: skipped with the reason where `make taskvine` has not
run, a failure under CI (PCM_REQUIRE_TASKVINE=1), like the HTCondor pool."""
from __future__ import annotations

import os
from types import ModuleType

import pytest


def require_taskvine() -> ModuleType:
    """``ndcctools.taskvine``, or skip the calling test module (call it at module level)."""
    try:
        import ndcctools.taskvine as vine
    except ImportError:
        if os.environ.get("PCM_REQUIRE_TASKVINE"):
            raise
        pytest.skip("TaskVine is not built: run `make taskvine` (or conda install -c conda-forge ndcctools)",
                    allow_module_level=True)
    return vine
