"""Workloads: stored as their rows arrive, queued whole, then watched until their output is written."""
from __future__ import annotations

import json
import uuid
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from pcm_service.core.config import ServiceConfig
from pcm_service.core.errors import NoChatTemplate, OutputRefused, UnknownWorkload
from pcm_service.core.models import Models
from pcm_service.core.views import workload_status
from pcm_service.protocol import (
    BatchState,
    ContextSpec,
    OpenAIOutput,
    RowIn,
    SamplingSettings,
    SubmitResponse,
    WorkloadHeader,
    WorkloadState,
    WorkloadStatus,
    WorkloadSubmission,
)
from pcm_service.store import Store, in_list
from pcm_service.weights.modelpaths import has_chat_template, no_chat_template
from pcm_service.weights.replicas import ReplicaMap

STAGE_CHUNK = 2000  # rows per transaction while a workload streams in


def confined_output(text: str, field: str, roots: Optional[tuple[Path, ...]], state_dir: Path,
                    secrets: tuple[Path, ...]) -> str:
    """``text`` resolved (links followed), if the service may write there: the path it will
    write, so the file lands where it was checked. Raises OutputRefused."""
    p = Path(text)
    if not p.is_absolute():
        raise OutputRefused(field, f"{text!r} is not an absolute path (the CLI resolves workload paths)")
    real = p.resolve()
    if real.is_relative_to(state_dir.resolve()):
        raise OutputRefused(field, f"{text} resolves to {real}, inside the state directory {state_dir.resolve()}")
    if any(real == s.resolve() for s in secrets):
        raise OutputRefused(field, f"{text} resolves to {real}, a secret file of the service")
    if roots is not None and not any(real.is_relative_to(r.resolve()) for r in roots):
        where = ", ".join(str(r.resolve()) for r in roots) or "none"
        raise OutputRefused(field, f"{text} resolves to {real}, outside every output root ({where};"
                                   " see pcm serve --output-root)")
    if real.is_dir():
        raise OutputRefused(field, f"{real} is a directory; name a file")
    return str(real)


def row_request(row: RowIn, default: SamplingSettings) -> Optional[str]:
    """What a row carries beyond its prompt (json), or None: its messages, and its sampling
    settings where they differ from the workload's."""
    extra: dict[str, object] = {}
    if row.messages is not None:
        extra["messages"] = [m.model_dump(mode="json", exclude_none=True) for m in row.messages]
    if row.sampling is not None and row.sampling != default:
        extra["sampling"] = row.sampling.model_dump(mode="json")
    return json.dumps(extra) if extra else None


class Workloads:
    """Submit workloads (their rows stored as they arrive) and report how one stands."""

    def __init__(self, store: Store, clock: Callable[[], float], config: ServiceConfig, state_dir: Path,
                 replicas: ReplicaMap, models: Models) -> None:
        self.store, self.clock, self.config, self.state_dir = store, clock, config, state_dir
        self.replicas, self.models = replicas, models

    def context_of(self, model: Optional[str], context: Optional[ContextSpec]) -> ContextSpec:
        """The context a submission names: a model directory, or a registered model's name.
        Raises UnknownModel or ModelUnavailable."""
        spec = self.models.named_model(model).context() if model is not None else context
        assert spec is not None
        spec = spec.model_copy(deep=True)
        spec.model_digest = self.replicas.register_model(spec.model).digest
        env = self.replicas.environment
        spec.environment = env.digest if env is not None else ""
        return spec

    def check_chat(self, context: ContextSpec, model: Optional[str]) -> None:
        """Raises NoChatTemplate if chat rows cannot run on the context's model."""
        if not has_chat_template(context.model):
            raise NoChatTemplate(no_chat_template(model or context.model))

    def submit(self, sub: WorkloadHeader, rows: Optional[Iterable[RowIn]] = None) -> SubmitResponse:
        """Store a workload with ``rows`` (default: the submission's own). Raises OutputRefused,
        ModelUnavailable, UnknownModel or NoChatTemplate, or what ``rows`` raises; then nothing
        is stored (outputs are checked first: a refused one registers no model either)."""
        output, openai = self.checked_outputs(sub.output, sub.openai)
        context = self.context_of(sub.model, sub.context)
        if rows is None:
            assert isinstance(sub, WorkloadSubmission)
            rows = sub.rows
        return self.insert_workload(sub.name, context, sub.model, sub.sampling, sub.batch_size,
                                    output, openai, self._chat_checked(rows, context, sub.model))

    def checked_outputs(self, output: str, openai: Optional[OpenAIOutput]) -> tuple[str, Optional[OpenAIOutput]]:
        """The files a submission names, confined to the output roots. Raises OutputRefused."""
        cfg = self.config

        def check(text: str, field: str) -> str:
            return confined_output(text, field, cfg.output_roots, self.state_dir, cfg.secret_paths)

        output = check(output, "output")
        if openai is not None:
            openai = openai.model_copy(update={"error_output": check(openai.error_output, "openai.error_output")})
        return output, openai

    def _chat_checked(self, rows: Iterable[RowIn], context: ContextSpec, model: Optional[str]) -> Iterator[RowIn]:
        """``rows``; the first chat row raises NoChatTemplate if the model has no chat template."""
        checked = False
        for row in rows:
            if row.messages is not None and not checked:
                self.check_chat(context, model)
                checked = True
            yield row

    def insert_workload(self, name: str, context: ContextSpec, model: Optional[str],
                        sampling: SamplingSettings, batch_size: int, output: str,
                        openai: Optional[OpenAIOutput], rows: Iterable[RowIn]) -> SubmitResponse:
        """Store a workload as its rows arrive: ``STAGE_CHUNK`` rows per transaction into staged
        batches (never leased; the writer is free between chunks, so workers and other
        submissions go on), then one transaction adds the workload and queues its batches. If
        ``rows`` raises, what was staged is removed: nothing of the workload stays."""
        ctx_id = context.context_id
        wl_id = "wl-" + uuid.uuid4().hex[:12]
        n_rows = n_batches = batch_id = 0
        staged = BatchState.STAGED.value
        it = iter(rows)
        try:
            while chunk := list(islice(it, STAGE_CHUNK)):
                values: list[tuple[object, ...]] = []
                with self.store.transaction() as db:
                    for row in chunk:
                        if n_rows % batch_size == 0:
                            batch_id = db.execute("INSERT INTO batches (workload_id, context_id, state) VALUES (?,?,?)",
                                                  (wl_id, ctx_id, staged)).lastrowid or 0
                            n_batches += 1
                        values.append((wl_id, n_rows, row.row_id, row.prompt or "", batch_id,
                                       row_request(row, sampling)))
                        n_rows += 1
                    db.executemany("INSERT INTO rows (workload_id, idx, row_id, prompt, batch_id, request)"
                                   " VALUES (?,?,?,?,?,?)", values)
            if n_rows == 0:
                raise ValueError("a workload needs at least one row")
            with self.store.transaction() as db:
                db.execute("INSERT OR IGNORE INTO contexts (context_id, spec) VALUES (?, ?)",
                           (ctx_id, context.model_dump_json()))
                db.execute(
                    "INSERT INTO workloads (workload_id, name, context_id, sampling, batch_size, output,"
                    " rows_total, state, created_at, model_name, openai) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (wl_id, name, ctx_id, sampling.model_dump_json(), batch_size, output, n_rows,
                     WorkloadState.RUNNING.value, self.clock(), model,
                     openai.model_dump_json() if openai else None))
                db.execute("UPDATE batches SET state=? WHERE workload_id=? AND state=?",
                           (BatchState.QUEUED.value, wl_id, staged))
        except BaseException:
            self.discard_staged(wl_id)
            raise
        return SubmitResponse(workload_id=wl_id, context_id=ctx_id, rows=n_rows, batches=n_batches)

    def discard_staged(self, wl_id: Optional[str] = None) -> int:
        """Remove the staged batches and rows of a submission that did not complete (all of
        them: what a crash left mid-ingest), a few hundred batches per transaction."""
        staged, removed = BatchState.STAGED.value, 0
        while True:
            with self.store.transaction() as db:
                ids = [r[0] for r in db.execute(
                    "SELECT batch_id FROM batches WHERE state=? AND (?2 IS NULL OR workload_id=?2) LIMIT 500",
                    (staged, wl_id))]
                if not ids:
                    return removed
                marks, bound = in_list(ids)
                db.execute(f"DELETE FROM rows WHERE batch_id IN {marks}", bound)
                db.execute(f"DELETE FROM batches WHERE batch_id IN {marks}", bound)
                removed += len(ids)

    def workload_status(self, wl_id: str) -> WorkloadStatus:
        """How one workload stands; raises UnknownWorkload."""
        with self.store.read() as db:
            r = db.execute("SELECT * FROM workloads WHERE workload_id=?", (wl_id,)).fetchone()
        if r is None:
            raise UnknownWorkload(wl_id)
        return workload_status(r, self.clock())
