"""OpenAI Files and Batches over PCM workloads.

A batch is created at once (``validating``); its file is then checked line by line. Errors
end it ``failed`` with nothing run; otherwise it becomes a workload, and from then on its
status is the workload's: it is scaled for, leased, cancelled and expired like any other.
"""
from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Callable, Optional

from pcm_service.batchapi.lines import check_batch_file, read_batch_rows
from pcm_service.batchapi.objects import (
    COMPLETION_WINDOWS,
    BatchErrorItem,
    BatchErrors,
    BatchObject,
    FileObject,
    RequestCounts,
)
from pcm_service.core.errors import Conflict, NoChatTemplate, UnknownModel, UnknownObject
from pcm_service.core.models import Models
from pcm_service.core.results import end_workload, settle_cancelling
from pcm_service.core.workloads import Workloads
from pcm_service.protocol import (
    BatchEndpoint,
    BatchState,
    OpenAIBatchStatus,
    OpenAIOutput,
    RowErrorCode,
    SamplingSettings,
    WorkloadState,
)
from pcm_service.store import Store
from pcm_service.tokens import private_dir
from pcm_service.weights.modelpaths import ModelUnavailable

BATCH_SIZE = 16  # rows per leased batch of an OpenAI batch
_STATUS_OF = {WorkloadState.RUNNING: OpenAIBatchStatus.IN_PROGRESS,
              WorkloadState.CANCELLING: OpenAIBatchStatus.CANCELLING,
              WorkloadState.COMPLETED: OpenAIBatchStatus.COMPLETED,
              WorkloadState.CANCELLED: OpenAIBatchStatus.CANCELLED,
              WorkloadState.EXPIRED: OpenAIBatchStatus.EXPIRED}


def _ts(v: Optional[float]) -> Optional[int]:
    return None if v is None else int(v)


def _file(r: sqlite3.Row) -> FileObject:
    return FileObject(id=r["file_id"], bytes=r["bytes"], created_at=int(r["created_at"]),
                      filename=r["filename"], purpose=r["purpose"], expires_at=_ts(r["expires_at"]))


def _batch_object(b: sqlite3.Row, wl: Optional[sqlite3.Row]) -> BatchObject:
    obj = BatchObject(id=b["batch_id"], endpoint=b["endpoint"], input_file_id=b["input_file_id"],
                      completion_window=b["completion_window"], status=OpenAIBatchStatus(b["status"]),
                      created_at=int(b["created_at"]), expires_at=int(b["expires_at"]), model=b["model"],
                      in_progress_at=_ts(b["in_progress_at"]), failed_at=_ts(b["failed_at"]),
                      cancelling_at=_ts(b["cancelling_at"]), output_file_id=b["output_file_id"],
                      error_file_id=b["error_file_id"],
                      metadata=json.loads(b["metadata"]) if b["metadata"] else None,
                      errors=BatchErrors.model_validate_json(b["errors"]) if b["errors"] else None)
    if wl is None and obj.status == OpenAIBatchStatus.CANCELLED:  # cancelled while validating
        obj.cancelled_at = obj.cancelling_at
    if wl is not None:
        state = WorkloadState(wl["state"])
        obj.status = _STATUS_OF[state]
        obj.request_counts = RequestCounts(total=wl["rows_total"], failed=wl["rows_failed"],
                                           completed=wl["rows_done"] - wl["rows_failed"])
        end = _ts(wl["finished_at"])
        if state == WorkloadState.COMPLETED:
            obj.finalizing_at = obj.completed_at = end
        elif state == WorkloadState.CANCELLED:
            obj.cancelled_at = end
        elif state == WorkloadState.EXPIRED:
            obj.expired_at = end
    return obj


class OpenAIBatches:
    """OpenAI's Files and Batches: uploads, batches checked then run as workloads, cancels, expiry."""

    def __init__(self, store: Store, clock: Callable[[], float], state_dir: Path, models: Models,
                 workloads: Workloads) -> None:
        self.store, self.clock, self.state_dir = store, clock, state_dir
        self.models, self.workloads = models, workloads

    @property
    def files_dir(self) -> Path:
        """Where uploads and batch results are kept."""
        return private_dir(self.state_dir / "files")  # uploads hold prompts: 0700, as the state dir

    # Files

    def new_file_id(self) -> tuple[str, Path]:
        file_id = "file-" + uuid.uuid4().hex[:24]
        return file_id, self.files_dir / f"{file_id}.jsonl"

    def add_file(self, file_id: str, path: Path, filename: str, purpose: str) -> FileObject:
        """Record an uploaded file, already written (and fsynced) at ``path``."""
        now = self.clock()
        with self.store.transaction() as db:
            db.execute("INSERT INTO files (file_id, filename, purpose, bytes, path, created_at, expires_at)"
                       " VALUES (?,?,?,?,?,?,?)", (file_id, filename, purpose, path.stat().st_size, str(path),
                                                   now, now + 30 * 86400))
        return self.file(file_id)

    def _file_row(self, file_id: str) -> sqlite3.Row:
        with self.store.read() as db:
            r = db.execute("SELECT * FROM files WHERE file_id=?", (file_id,)).fetchone()
        if r is None:
            raise UnknownObject(f"No such File object: {file_id}")
        return r

    def file(self, file_id: str) -> FileObject:
        return _file(self._file_row(file_id))

    def file_path(self, file_id: str) -> Path:
        return Path(self._file_row(file_id)["path"])

    def files(self, purpose: Optional[str] = None) -> list[FileObject]:
        with self.store.read() as db:
            rows = db.execute("SELECT * FROM files WHERE ?1 IS NULL OR purpose=?1 ORDER BY created_at, file_id",
                              (purpose,)).fetchall()
        return [_file(r) for r in rows]

    def delete_file(self, file_id: str) -> None:
        path = self.file_path(file_id)
        with self.store.transaction() as db:
            db.execute("DELETE FROM files WHERE file_id=?", (file_id,))
        path.unlink(missing_ok=True)

    # Batches

    def create_batch(self, input_file_id: str, endpoint: str, window: str,
                     metadata: Optional[dict[str, str]]) -> BatchObject:
        now = self.clock()
        batch_id = "batch_" + uuid.uuid4().hex[:24]
        with self.store.transaction() as db:
            db.execute("INSERT INTO openai_batches (batch_id, input_file_id, endpoint, completion_window,"
                       " metadata, status, created_at, expires_at) VALUES (?,?,?,?,?,?,?,?)",
                       (batch_id, input_file_id, endpoint, window, json.dumps(metadata) if metadata else None,
                        OpenAIBatchStatus.VALIDATING.value, now, now + COMPLETION_WINDOWS[window]))
        return self.batch(batch_id)

    def fail_batch(self, batch_id: str, errors: list[BatchErrorItem]) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE openai_batches SET status=?, errors=?, failed_at=? WHERE batch_id=?",
                       (OpenAIBatchStatus.FAILED.value, BatchErrors(data=errors).model_dump_json(),
                        self.clock(), batch_id))

    def validate_batch(self, batch_id: str) -> None:
        """Check a ``validating`` batch's file; fail it or start its workload."""
        with self.store.read() as db:
            b = db.execute("SELECT * FROM openai_batches WHERE batch_id=? AND status=?",
                           (batch_id, OpenAIBatchStatus.VALIDATING.value)).fetchone()
        if b is None:
            return
        try:
            path = self.file_path(b["input_file_id"])
        except UnknownObject as e:
            return self.fail_batch(batch_id, [BatchErrorItem(code="invalid_request", message=str(e),
                                                              param="input_file_id")])
        endpoint = BatchEndpoint(b["endpoint"])
        summary = check_batch_file(path, endpoint, self.models.has_model)
        if summary.errors:
            return self.fail_batch(batch_id, [BatchErrorItem(code=e.code, message=e.message, param=e.param,
                                                              line=e.line) for e in summary.errors])
        assert summary.model is not None
        try:
            context = self.workloads.context_of(summary.model, None)
            if summary.has_chat:
                self.workloads.check_chat(context, summary.model)
        except (UnknownModel, ModelUnavailable) as e:
            code = "model_not_found" if isinstance(e, UnknownModel) else "invalid_request"
            return self.fail_batch(batch_id, [BatchErrorItem(code=code, message=str(e), param="body.model")])
        except NoChatTemplate as e:  # every line is a chat line: the first one is at fault
            return self.fail_batch(batch_id, [BatchErrorItem(code="invalid_request", message=str(e), line=1,
                                                              param="body.messages")])
        out_dir = self.files_dir
        spec = OpenAIOutput(endpoint=endpoint, error_output=str(out_dir / f"{batch_id}.errors.jsonl"),
                            batch_id=batch_id, expires_at=b["expires_at"])
        sub = self.workloads.insert_workload(batch_id, context, summary.model, SamplingSettings(), BATCH_SIZE,
                                   str(out_dir / f"{batch_id}.output.jsonl"), spec,
                                   read_batch_rows(path, endpoint))
        with self.store.transaction() as db:
            db.execute("UPDATE openai_batches SET status=?, workload_id=?, model=?, in_progress_at=?"
                       " WHERE batch_id=?", (OpenAIBatchStatus.IN_PROGRESS.value, sub.workload_id,
                                             summary.model, self.clock(), batch_id))

    def validating_batches(self) -> list[str]:
        with self.store.read() as db:
            return [r["batch_id"] for r in db.execute("SELECT batch_id FROM openai_batches WHERE status=?",
                                                      (OpenAIBatchStatus.VALIDATING.value,))]

    @staticmethod
    def _batch_row(db: sqlite3.Connection, batch_id: str) -> sqlite3.Row:
        b = db.execute("SELECT * FROM openai_batches WHERE batch_id=?", (batch_id,)).fetchone()
        if b is None:
            raise UnknownObject(f"No batch found with id '{batch_id}'.")
        return b

    @staticmethod
    def _object(db: sqlite3.Connection, b: sqlite3.Row) -> BatchObject:
        wl = db.execute("SELECT * FROM workloads WHERE workload_id=?", (b["workload_id"],)).fetchone() \
            if b["workload_id"] else None
        return _batch_object(b, wl)

    def batch(self, batch_id: str) -> BatchObject:
        with self.store.read() as db:
            return self._object(db, self._batch_row(db, batch_id))

    def batches(self, after: Optional[str], limit: int) -> tuple[list[BatchObject], bool]:
        """Newest first, as OpenAI lists them; ``after``: the last id of the previous page."""
        with self.store.read() as db:
            start = db.execute("SELECT created_at FROM openai_batches WHERE batch_id=?", (after,)).fetchone() \
                if after else None
            rows = db.execute("SELECT * FROM openai_batches WHERE ?1 IS NULL OR (created_at, batch_id) < (?1, ?2)"
                              " ORDER BY created_at DESC, batch_id DESC LIMIT ?3",
                              (start["created_at"] if start else None, after, limit + 1)).fetchall()
            page = [self._object(db, r) for r in rows[:limit]]
        return page, len(rows) > limit

    def cancel_batch(self, batch_id: str) -> BatchObject:
        """Stop leasing the batch's rows; it is ``cancelled`` once the batches in flight are back."""
        now = self.clock()
        with self.store.transaction() as db:
            b = self._batch_row(db, batch_id)
            obj = self._object(db, b)
            if obj.status == OpenAIBatchStatus.VALIDATING:
                db.execute("UPDATE openai_batches SET status=?, cancelling_at=? WHERE batch_id=?",
                           (OpenAIBatchStatus.CANCELLED.value, now, batch_id))
            elif obj.status in (OpenAIBatchStatus.IN_PROGRESS, OpenAIBatchStatus.CANCELLING):
                db.execute("UPDATE openai_batches SET cancelling_at=COALESCE(cancelling_at, ?) WHERE batch_id=?",
                           (now, batch_id))
                self._cancel_workload(db, now, b["workload_id"])
            else:
                raise Conflict(f"Cannot cancel a batch with status '{obj.status.value}'.")
        return self.batch(batch_id)

    def _cancel_workload(self, db: sqlite3.Connection, now: float, wl_id: str) -> None:
        db.execute("UPDATE workloads SET state=? WHERE workload_id=? AND state=?",
                   (WorkloadState.CANCELLING.value, wl_id, WorkloadState.RUNNING.value))
        db.execute("UPDATE batches SET state=? WHERE workload_id=? AND state=?",
                   (BatchState.CANCELLED.value, wl_id, BatchState.QUEUED.value))
        settle_cancelling(db, now, wl_id)

    def settle_workloads(self) -> None:
        """Housekeeping (each reaper cycle): finish cancellations whose batches came back, and
        expire workloads whose completion window passed."""
        now = self.clock()
        with self.store.transaction() as db:
            settle_cancelling(db, now)
            for r in db.execute("SELECT workload_id, openai FROM workloads WHERE state IN (?, ?)"
                                " AND openai IS NOT NULL", (WorkloadState.RUNNING.value,
                                                            WorkloadState.CANCELLING.value)).fetchall():
                spec = OpenAIOutput.model_validate_json(r["openai"])
                if spec.expires_at is not None and spec.expires_at <= now:
                    end_workload(db, now, r["workload_id"], WorkloadState.EXPIRED, RowErrorCode.EXPIRED)
