"""Schemathesis hooks for fuzzing a real `pcm serve` (tests/test_fuzz_api.py).

Each operation gets the token the service documents for it (pool, API or a worker's own), and
every request the service rejects must leave its SQLite state exactly as it was. Two workers
are registered: every worker route is called with worker A's credential, its path naming A or
B, and no call may change anything of B's (its row, batches, replicas, claims, engine events).
"""
from __future__ import annotations

import json
import os
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import schemathesis

STATE = Path(os.environ["PCM_FUZZ_STATE"])
CHECKED = Path(os.environ["PCM_FUZZ_CHECKED"])  # one line per rejected request whose state was compared
TOKENS = {kind: Path(os.environ[f"PCM_FUZZ_{kind.upper()}_TOKEN_FILE"]).read_text().strip()
          for kind in ("pool", "api")}
WORKERS = json.loads(os.environ["PCM_FUZZ_WORKERS"])  # [[id, token], [id, token]]: A acts, B must stay as it is
(ME, MY_TOKEN), (OTHER, _) = WORKERS
# what is B's: every row that names it
OTHERS_ROWS = {"workers": "worker_id", "batches": "worker_id", "replicas": "worker_id", "claimed_chunks": "worker_id",
               "peers": "worker_id", "library_events": "worker_id", "transfers": "worker_id"}
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


def others() -> dict[str, list[tuple[Any, ...]]]:
    """Every row of worker B's."""
    db = sqlite3.connect(f"file:{STATE}?mode=ro", uri=True)
    try:
        return {t: sorted(db.execute(f"SELECT * FROM {t} WHERE {col}=?", (OTHER,)).fetchall(), key=repr)
                for t, col in OTHERS_ROWS.items()}
    finally:
        db.close()


def _kind(operation: Any) -> str:
    security = operation.definition.raw.get("security") or [{}]
    return "worker" if "WorkerToken" in security[0] else "pool" if "PoolToken" in security[0] else "api"


@schemathesis.hook
def map_path_parameters(context: Any, path_parameters: dict[str, Any]) -> dict[str, Any]:
    """A worker route names worker A (its own) or, one time in four, worker B (another's)."""
    if path_parameters and "worker_id" in path_parameters:
        value = str(path_parameters["worker_id"])
        path_parameters["worker_id"] = OTHER if zlib.crc32(value.encode()) % 4 == 0 else ME
    return path_parameters


@schemathesis.auth(refresh_interval=None)
class ServiceTokens:
    """The pool token where the document says PoolToken, the API token where it says ApiToken,
    worker A's own credential where it says WorkerToken."""

    def get(self, case: Any, context: Any) -> str:
        kind = _kind(context.operation)
        return MY_TOKEN if kind == "worker" else TOKENS[kind]

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: Any) -> None:
    _before["state"] = snapshot()
    _before["others"] = others()


@schemathesis.check
def another_workers_state_is_untouched(ctx: Any, response: Any, case: Any) -> None:
    if "others" not in _before:
        return
    after = others()
    changed = [t for t in after if after[t] != _before["others"][t]]
    if changed:
        raise AssertionError(f"{response.status_code} answer with worker A's credential changed worker B's"
                             f" rows in {changed}")


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
