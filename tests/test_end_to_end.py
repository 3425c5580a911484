"""`pcm run` on the real vLLM CPU engine: ordered, exact results and one engine start per worker."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO
from tests.support.models import ENGINE, reference_texts

pytestmark = pytest.mark.engine

N_ROWS = 120
BAD_ROW = 37  # far longer than max_model_len: the engine rejects this row only


def rows() -> list[dict[str, str]]:
    out = [{"id": f"c{i:03d}", "claim": f"Statement {i}: the river {i % 7} flows north."}
           for i in range(N_ROWS)]
    out[BAD_ROW]["claim"] = "very long " * 400
    return out

PcmRun = tuple[Path, dict[str, Any], "subprocess.CompletedProcess[str]"]  # its directory, workload, `pcm run`


@pytest.fixture(scope="module")
def pcm_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> PcmRun:
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()))
    import yaml

    spec = {"name": "e2e", "model": str(tiny_model), "engine": ENGINE,
            "sampling": {"temperature": 0, "max_tokens": 12},
            "inputs": {"path": "inputs.jsonl", "template": "Claim: {claim}\nVerdict:", "id_field": "id"},
            "batch_size": 10, "output": "out/results.jsonl"}
    (tmp / "wl.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "pcm_service.cli", "run", str(tmp / "wl.yaml"),
                           "--workers", "2", "--state-dir", str(tmp / "state")],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    return tmp, spec, proc


def test_run_exits_0_and_prints_output_path(pcm_run: PcmRun) -> None:
    tmp, _, proc = pcm_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(tmp / "out" / "results.jsonl")


def test_every_row_once_in_input_order_with_bad_row_as_error(pcm_run: PcmRun) -> None:
    tmp, _, proc = pcm_run
    lines = [json.loads(x) for x in (tmp / "out" / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in rows()]
    bad = lines[BAD_ROW]
    assert bad["text"] is None and "maximum context length" in bad["error"]
    good = [x for i, x in enumerate(lines) if i != BAD_ROW]
    assert all(x["error"] is None and x["finish_reason"] in ("length", "stop") for x in good)
    assert all(x["prompt_tokens"] > 0 and 0 < x["completion_tokens"] <= 12 for x in good)


def test_greedy_text_equals_vllm_llm_generate(pcm_run: PcmRun, tiny_model: Path) -> None:
    tmp, spec, _ = pcm_run
    prompts = [f"Claim: {r['claim']}\nVerdict:" for i, r in enumerate(rows()) if i != BAD_ROW]
    expected = reference_texts(tiny_model, prompts, spec["engine"], spec["sampling"], tmp)
    lines = [json.loads(x) for x in (tmp / "out" / "results.jsonl").read_text().splitlines()]
    got = [x["text"] for i, x in enumerate(lines) if i != BAD_ROW]
    assert len(got) == len(expected) == N_ROWS - 1
    mismatches = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not mismatches, mismatches[:3]


def test_each_worker_started_its_engine_exactly_once(pcm_run: PcmRun) -> None:
    tmp, _, _ = pcm_run
    db = sqlite3.connect(tmp / "state" / "service" / "pcm.sqlite3")
    starts = dict(db.execute("SELECT worker_id, COUNT(*) FROM library_events WHERE state='ready'"
                             " GROUP BY worker_id").fetchall())
    batches = dict(db.execute("SELECT worker_id, COUNT(DISTINCT batch_id) FROM rows GROUP BY worker_id")
                   .fetchall())
    batches.pop(None, None)
    assert batches and set(batches) <= set(starts)
    assert all(n == 1 for n in starts.values()), starts
    assert max(batches.values()) >= 5, batches  # one engine start served many batches
    assert sum(batches.values()) >= N_ROWS // 10


def test_tokens_are_0600_files_and_in_no_other_file_of_the_run(pcm_run: PcmRun) -> None:
    """`pcm run` made its own pool and API tokens; no log, database or output holds them."""
    tmp, _, proc = pcm_run
    service = tmp / "state" / "service"
    tokens = [(service / name).read_text().strip() for name in ("api.token", "pool.token")]
    assert all(len(t) >= 40 for t in tokens) and tokens[0] != tokens[1]
    assert all(((service / n).stat().st_mode & 0o777) == 0o600 for n in ("api.token", "pool.token"))
    files = [p for p in tmp.rglob("*") if p.is_file() and not (p.parent == service and p.suffix == ".token")]
    assert any(p.name == "worker.log" for p in files) and any(p.name == "pcm.sqlite3" for p in files)
    for p in files:
        data = p.read_bytes()
        assert not any(t.encode() in data for t in tokens), p
    assert not any(t in proc.stdout + proc.stderr for t in tokens)
