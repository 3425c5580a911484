"""The service's own records, read by tests: its SQLite state, and files that hold a secret."""
from __future__ import annotations

import sqlite3
from pathlib import Path


def db(state_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(state_dir / "pcm.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def files_containing(root: Path, secrets: list[str]) -> list[str]:
    """Every file under ``root`` (logs, state, outputs) that contains one of ``secrets``;
    token files themselves excluded."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.name.endswith(".token"):
            data = p.read_bytes()
            if any(s.encode() in data for s in secrets):
                hits.append(str(p))
    return hits
