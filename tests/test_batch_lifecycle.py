"""An OpenAI batch's life inside ServiceCore (no HTTP, no engine, a hand-set clock): it becomes
a workload the pool leases, it survives a restart, a cancel waits for the batches in flight,
and the rows left when the completion window passes end as `batch_expired`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pcm_service.core import ServiceConfig, ServiceCore
from pcm_service.protocol import BatchReport, NamedModel, OpenAIBatchStatus
from tests.support.clock import FakeClock
from tests.support.models import fake_model
from tests.support.openai_batch import chat_body, line, write_lines
from tests.test_core import lease, ok, ready_worker

DAY = 24 * 3600


def chat_model(d: Path) -> Path:
    fake_model(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return d


def start(tmp_path: Path, clock: FakeClock) -> ServiceCore:
    return ServiceCore(tmp_path / "state", ServiceConfig(model_roots=(tmp_path,)), clock=clock)


def batch_of(core: ServiceCore, tmp_path: Path, n: int) -> str:
    core.add_model(NamedModel(name="m", path=str(chat_model(tmp_path / "m"))))
    lines = [line(f"r{i}", chat_body("m", f"claim {i}", max_tokens=4, temperature=0)) for i in range(n)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    file_id, stored = core.new_file_id()
    stored.write_bytes(path.read_bytes())
    core.add_file(file_id, stored, path.name, "batch")
    b = core.create_batch(file_id, "/v1/chat/completions", "24h", {"k": "v"})
    assert b.status == OpenAIBatchStatus.VALIDATING
    return b.id


def lines_of(core: ServiceCore, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(x) for x in core.file_path(file_id).read_text().splitlines()]


def test_a_batch_survives_a_restart_then_runs_like_any_workload(tmp_path: Path) -> None:
    clock = FakeClock()
    core = start(tmp_path, clock)
    batch_id = batch_of(core, tmp_path, 20)
    core.close()  # the service stops before validating it
    core = start(tmp_path, clock)
    assert core.validating_batches() == [batch_id]
    core.validate_batch(batch_id)
    b = core.batch(batch_id)
    assert b.status == OpenAIBatchStatus.IN_PROGRESS and b.request_counts.total == 20 and b.model == "m"
    st = core.status()
    assert [w.name for w in st.workloads] == [batch_id] and st.demand.rows_left == 20
    ctx = st.workloads[0].context_id
    wid = ready_worker(core, ctx)
    while leases := lease(core, wid, ctx, 4):
        for bl in leases:
            assert bl.rows[0].messages is not None and bl.rows[0].sampling is not None
            assert bl.rows[0].sampling.max_tokens == 4
            core.report(wid, BatchReport(batch_id=bl.batch_id, results=[ok(r.idx) for r in bl.rows]))
    b = core.batch(batch_id)
    assert b.status == OpenAIBatchStatus.COMPLETED and b.request_counts.completed == 20
    assert b.error_file_id is None and {x["custom_id"] for x in lines_of(core, b.output_file_id)} == \
        {f"r{i}" for i in range(20)}
    core.close()


def test_cancel_waits_for_the_batches_in_flight(tmp_path: Path) -> None:
    core = start(tmp_path, FakeClock())
    batch_id = batch_of(core, tmp_path, 40)
    core.validate_batch(batch_id)
    ctx = core.status().workloads[0].context_id
    wid = ready_worker(core, ctx)
    first, second = lease(core, wid, ctx, 2)
    core.report(wid, BatchReport(batch_id=first.batch_id, results=[ok(r.idx) for r in first.rows]))
    assert core.cancel_batch(batch_id).status == OpenAIBatchStatus.CANCELLING
    assert lease(core, wid, ctx, 4) == []  # nothing more is leased
    assert core.status().demand.rows_left == 0
    core.report(wid, BatchReport(batch_id=second.batch_id, results=[ok(r.idx) for r in second.rows[:3]],
                                 returned=[r.idx for r in second.rows[3:]]))
    b = core.batch(batch_id)
    assert b.status == OpenAIBatchStatus.CANCELLED and b.cancelled_at is not None
    done = b.request_counts.completed
    assert done == len(first.rows) + 3 and b.request_counts.failed == 40 - done
    errors = lines_of(core, b.error_file_id)
    assert all(x["error"]["code"] == "batch_cancelled" and x["response"] is None for x in errors)
    assert len(lines_of(core, b.output_file_id)) + len(errors) == 40
    core.close()


def test_rows_left_when_the_window_passes_end_as_batch_expired(tmp_path: Path) -> None:
    clock = FakeClock()
    core = start(tmp_path, clock)
    batch_id = batch_of(core, tmp_path, 40)
    core.validate_batch(batch_id)
    ctx = core.status().workloads[0].context_id
    wid = ready_worker(core, ctx)
    (bl,) = lease(core, wid, ctx, 1)
    core.report(wid, BatchReport(batch_id=bl.batch_id, results=[ok(r.idx) for r in bl.rows]))
    clock.t += DAY - 1
    core.settle_workloads()
    assert core.batch(batch_id).status == OpenAIBatchStatus.IN_PROGRESS
    clock.t += 1
    core.settle_workloads()
    b = core.batch(batch_id)
    assert b.status == OpenAIBatchStatus.EXPIRED and b.expired_at == int(clock.t)
    assert len(lines_of(core, b.output_file_id)) == len(bl.rows)
    expired = lines_of(core, b.error_file_id)
    assert len(expired) == 40 - len(bl.rows) and all(x["error"]["code"] == "batch_expired" for x in expired)
    core.close()
