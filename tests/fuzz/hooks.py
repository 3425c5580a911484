"""Schemathesis hooks for fuzzing a real `pcm serve` (tests/test_fuzz_api.py).

Each operation gets the token the service documents for it (pool or API), and every request
the service rejects must leave its SQLite state exactly as it was.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import schemathesis

STATE = Path(os.environ["PCM_FUZZ_STATE"])
CHECKED = Path(os.environ["PCM_FUZZ_CHECKED"])  # one line per rejected request whose state was compared
TOKENS = {kind: Path(os.environ[f"PCM_FUZZ_{kind.upper()}_TOKEN_FILE"]).read_text().strip()
          for kind in ("pool", "api")}
_before: dict[str, Any] = {}
# a streamed submission (POST /v1/pcm/workload-streams) is NDJSON text: sent as generated
schemathesis.serializer.alias("application/x-ndjson", "text/plain")


def snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the service's state."""
    db = sqlite3.connect(f"file:{STATE}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        db.close()


def _kind(operation: Any) -> str:
    security = operation.definition.raw.get("security") or [{}]
    return "pool" if "PoolToken" in security[0] else "api"


@schemathesis.auth(refresh_interval=None)
class ServiceTokens:
    """The pool token where the document says PoolToken, the API token where it says ApiToken."""

    def get(self, case: Any, context: Any) -> str:
        return TOKENS[_kind(context.operation)]

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: Any) -> None:
    _before["state"] = snapshot()


@schemathesis.check
def rejected_request_changes_nothing(ctx: Any, response: Any, case: Any) -> None:
    if response.status_code < 400 or "state" not in _before:
        return
    with CHECKED.open("a") as log:  # the test counts these: proof the check ran
        log.write(f"{response.status_code} {case.operation.label}\n")
    after = snapshot()
    changed = [t for t in after if after[t] != _before["state"].get(t)]
    if changed:
        raise AssertionError(f"{response.status_code} answer changed the service's state: tables {changed}")
