"""SQLite state of the service (WAL, synchronous=FULL): committed means durable."""
from __future__ import annotations

import enum
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from pcm_service.protocol import BatchState, RowState, WorkerKind
from pcm_service.tokens import private_dir, private_file

T = TypeVar("T")

# workers that run rows: every kind but the TaskVine manager, which only holds leases
# (bind MANAGER_KIND to it)
RUNS_ROWS = "(kind IS NULL OR kind != ?)"
MANAGER_KIND = WorkerKind.VINE_MANAGER.value


def in_list(values: Iterable[Any]) -> tuple[str, list[Any]]:
    """``(?,?,…)`` and the values to bind to it (an enum member binds its value), for ``IN``:
    states are never spelled in SQL. An empty list is ``()``, which matches nothing."""
    bound = [v.value if isinstance(v, enum.Enum) else v for v in values]
    return "(" + ",".join("?" * len(bound)) + ")", bound


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS contexts (
    context_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    start_failures INTEGER NOT NULL DEFAULT 0  -- engine starts failed by its assigned workers since one was ready
);
CREATE TABLE IF NOT EXISTS workloads (
    workload_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    context_id TEXT NOT NULL,
    sampling TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    output TEXT NOT NULL,
    rows_total INTEGER NOT NULL,
    rows_done INTEGER NOT NULL DEFAULT 0,
    rows_failed INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    model_name TEXT,  -- the registered model it was submitted with, if any
    openai TEXT  -- OpenAIOutput (json) of an OpenAI-format workload
);
CREATE TABLE IF NOT EXISTS rows (
    workload_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    row_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    batch_id INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT '{RowState.PENDING.value}',
    text TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    error TEXT,
    worker_id TEXT,
    finished_at REAL,
    crashes INTEGER NOT NULL DEFAULT 0,  -- library crashes while this row was in flight
    request TEXT,  -- json: the row's chat messages and own sampling settings, when it has them
    choices TEXT,  -- json: every choice, when there are several or they carry logprobs
    error_code TEXT,  -- RowErrorCode of a row that ended with an error
    PRIMARY KEY (workload_id, idx)
);
CREATE INDEX IF NOT EXISTS rows_by_batch ON rows (batch_id, state);
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY AUTOINCREMENT,
    workload_id TEXT NOT NULL,
    context_id TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT '{BatchState.QUEUED.value}',
    worker_id TEXT,
    lease_seq INTEGER NOT NULL DEFAULT 0,  -- the worker's lease response that leased it
    losses INTEGER NOT NULL DEFAULT 0,  -- requeued because its worker was lost
    leased_at REAL,
    audit_of INTEGER  -- an audit copy (core/audit.py) of this batch: its results go to audit_results
);
CREATE INDEX IF NOT EXISTS batches_by_state ON batches (state, context_id, batch_id);
CREATE INDEX IF NOT EXISTS batches_by_worker ON batches (worker_id, state);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    glidein_id TEXT,
    kind TEXT,  -- WorkerKind (NULL: an agent, from before kinds)
    resources TEXT NOT NULL,
    state TEXT NOT NULL,
    context_id TEXT,
    context_state TEXT NOT NULL,
    inflight INTEGER NOT NULL DEFAULT 0,
    rows_done INTEGER NOT NULL DEFAULT 0,
    lease_seq INTEGER NOT NULL DEFAULT 0,  -- lease responses given to this worker
    registered_at REAL NOT NULL,
    left_at REAL,
    last_heartbeat REAL NOT NULL,
    last_busy REAL NOT NULL,
    environment TEXT,  -- the packed environment's digest (NULL: a venv or an image)
    token_hash TEXT,  -- sha256 of the worker's own credential (its bearer token on its routes)
    assigned_context TEXT,  -- the context the service placed it on (engine events count for it alone)
    address TEXT  -- the IP it registered from (NULL: loopback or in-process): its host for audits
);
CREATE INDEX IF NOT EXISTS workers_by_glidein ON workers (glidein_id);
-- every change of a worker's state or of its context's, for `pcm report`: written by the
-- triggers below at the service's clock (pcm_now(), a function of the writer connection)
CREATE TABLE IF NOT EXISTS worker_history (
    worker_id TEXT NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    context_state TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS worker_registered AFTER INSERT ON workers BEGIN
    INSERT INTO worker_history VALUES (NEW.worker_id, pcm_now(), NEW.state, NEW.context_state);
END;
CREATE TRIGGER IF NOT EXISTS worker_changed AFTER UPDATE OF state, context_state ON workers
WHEN OLD.state IS NOT NEW.state OR OLD.context_state IS NOT NEW.context_state BEGIN
    INSERT INTO worker_history VALUES (NEW.worker_id, pcm_now(), NEW.state, NEW.context_state);
END;
CREATE TABLE IF NOT EXISTS library_events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL,
    context_id TEXT NOT NULL,
    state TEXT NOT NULL,
    seconds REAL NOT NULL,
    error TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    digest TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    signature TEXT NOT NULL,
    chunk_size INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS models_by_path ON models (path, signature, chunk_size);
CREATE TABLE IF NOT EXISTS peers (
    worker_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    slots INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    chunk TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    PRIMARY KEY (chunk, worker_id)
);
CREATE INDEX IF NOT EXISTS replicas_by_worker ON replicas (worker_id);
-- chunks a worker said at registration it held: where to place it, never a source for others
CREATE TABLE IF NOT EXISTS claimed_chunks (
    chunk TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    PRIMARY KEY (worker_id, chunk)
);
CREATE TABLE IF NOT EXISTS transfers (
    transfer_id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL,
    source TEXT NOT NULL,
    chunk TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    seconds REAL NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS named_models (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    engine TEXT NOT NULL,  -- EngineSettings (json)
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (  -- OpenAI Files: uploaded inputs and batch results
    file_id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL
);
CREATE TABLE IF NOT EXISTS openai_batches (
    batch_id TEXT PRIMARY KEY,
    input_file_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,  -- json
    status TEXT NOT NULL,  -- OpenAIBatchStatus until a workload exists, then from the workload
    errors TEXT,  -- json: OpenAI's errors list (code, message, param, line)
    workload_id TEXT,
    model TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at REAL NOT NULL,
    in_progress_at REAL,
    failed_at REAL,
    cancelling_at REAL,
    expires_at REAL NOT NULL
);
-- spot-check audits (core/audit.py): one per audit batch, finished when agreed is set
CREATE TABLE IF NOT EXISTS audits (
    audit_batch INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL,  -- the audited batch
    workload_id TEXT NOT NULL,
    original_worker TEXT NOT NULL,
    original_host TEXT NOT NULL,
    auditor_worker TEXT,
    auditor_host TEXT,
    rows_compared INTEGER,
    rows_matched INTEGER,
    agreed INTEGER,  -- NULL while open
    created_at REAL NOT NULL,
    finished_at REAL,
    excluded_host TEXT,  -- a tie-break: neither the original's host nor this one (the first auditor's) runs it
    tiebreak_of INTEGER  -- a tie-break: the audit whose disagreement it decides
);
-- an audit decided against a host: audit_bar_after of them bar it
CREATE TABLE IF NOT EXISTS strikes (
    host TEXT NOT NULL,
    audit_batch INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (host, audit_batch)
);
CREATE INDEX IF NOT EXISTS audits_by_host ON audits (original_host, agreed);
CREATE TABLE IF NOT EXISTS audit_results (  -- an auditor's answers, never a row's result
    audit_batch INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT,
    error TEXT,
    PRIMARY KEY (audit_batch, idx)
);
CREATE TABLE IF NOT EXISTS barred_hosts (  -- hosts whose workers get no more leases
    host TEXT PRIMARY KEY,
    barred_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

ADDED_COLUMNS = [("workloads", "model_name"), ("workloads", "openai"), ("rows", "request"),
                 ("rows", "choices"), ("rows", "error_code"), ("workers", "kind"),
                 ("workers", "environment"), ("workers", "token_hash"), ("workers", "assigned_context"),
                 ("contexts", "start_failures INTEGER NOT NULL DEFAULT 0"), ("batches", "audit_of INTEGER"),
                 ("workers", "address"), ("audits", "excluded_host"), ("audits", "tiebreak_of INTEGER")]


class Store:
    """One writer connection guarded by a lock, every ``transaction()`` committed or rolled back
    whole; reads on per-thread connections (WAL: a reader sees the last commit and never waits
    for the writer, so status answers while a long ingest or report is being written)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        private_dir(self.path.parent)  # 0700 and the database files 0600, whatever the umask
        private_file(self.path)
        for leftover in ("-wal", "-shm", "-journal"):  # SQLite makes new ones with the database's mode
            private_file(Path(f"{self.path}{leftover}"), create=False)
        self._conn = self._connect()
        self.set_clock(time.time)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._add_columns()
        self._lock = threading.RLock()
        self._local = threading.local()  # .writing: this thread is inside transaction(); .reader
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    def set_clock(self, clock: Callable[[], float]) -> None:
        """The time the triggers write (``pcm_now()``): the service's clock, simulated or not."""
        self._conn.create_function("pcm_now", 0, clock)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _add_columns(self) -> None:
        """A state directory from an older PCM gets the columns added since (TEXT unless declared)."""
        for table, column in ADDED_COLUMNS:
            name, _, decl = column.partition(" ")
            have = {r["name"] for r in self._conn.execute(f"PRAGMA table_info({table})")}
            if name not in have:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl or 'TEXT'}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if getattr(self._local, "grouped", False):  # one call of run_group: its savepoint is the transaction
            yield self._conn
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            outer, self._local.writing = getattr(self._local, "writing", False), True
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            finally:
                self._local.writing = outer
            self._conn.execute("COMMIT")

    def run_group(self, calls: Sequence[Callable[[], T]]) -> list[T | Exception]:
        """Run ``calls`` in one transaction, each in its own savepoint (a call that raises is
        undone alone and gets its exception back), committed once: a group commit, one fsync
        for them all. Nothing is returned before that commit."""
        outcomes: list[T | Exception] = []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._local.grouped = self._local.writing = True
            self._local.after = []
            try:
                for fn in calls:
                    self._conn.execute("SAVEPOINT call")
                    try:
                        outcomes.append(fn())
                    except Exception as e:
                        self._conn.execute("ROLLBACK TO call")
                        outcomes.append(e)
                    self._conn.execute("RELEASE call")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                self._local.after.clear()
                raise
            finally:
                self._local.grouped = self._local.writing = False
        hooks, self._local.after = self._local.after, []
        for hook in hooks:
            hook()
        return outcomes

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` once what this thread wrote is committed (at once outside a group)."""
        if getattr(self._local, "grouped", False):
            self._local.after.append(hook)
        else:
            hook()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot of the last commit (inside a transaction: that transaction's view)."""
        if getattr(self._local, "writing", False):
            yield self._conn
            return
        conn = getattr(self._local, "reader", None)
        if conn is None:
            conn = self._local.reader = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._conn.close()
