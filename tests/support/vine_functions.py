"""Functions a TaskVine Library serves in tests/test_taskvine.py (imported by reference in
the library process as tests.support.vine_functions: the repository root is on the vine_worker's
PYTHONPATH)."""
from __future__ import annotations

import os
from typing import Any

CONTEXT: dict[str, Any] = {}


def load_context(tag: str) -> dict[str, Any]:
    """The library's context: runs once per library process."""
    CONTEXT.update(tag=tag, pid=os.getpid(), loads=CONTEXT.get("loads", 0) + 1)
    return {}


def double(x: int) -> dict[str, Any]:
    return {"y": 2 * x, "pid": CONTEXT["pid"], "tag": CONTEXT["tag"], "loads": CONTEXT["loads"]}
