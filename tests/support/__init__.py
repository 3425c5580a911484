"""What the tests share that is not a fixture (conftest.py keeps the fixtures): a real
`pcm serve` process (``serve``), models and vLLM's reference texts (``models``), workload
files (``workloads``), waiting on outside systems (``waiting``), the service's SQLite state
(``state``), a fake clock (``clock``) and TaskVine or a skip (``taskvine``)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
