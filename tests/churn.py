"""The workload the churn tests share (one vLLM reference run per session) and their checks."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from conftest import ENGINE, reference_texts

# every row generates exactly 128 tokens: at ~70 tokens/s per row (64 rows in flight on 2
# cores) a row takes ~2 s, longer than a worker's drain timeout (1 s)
SAMPLING = {"temperature": 0, "max_tokens": 128, "min_tokens": 128}


def rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"q{i:04d}", "claim": f"Statement {i}: the river {i % 7} flows past town {i % 13}."}
            for i in range(n)]


def prompts(n: int) -> list[str]:
    return [f"Claim: {r['claim']}\nVerdict:" for r in rows(n)]


def write_workload(tmp: Path, model: Path, n: int, batch_size: int = 10, name: str = "churn") -> Path:
    (tmp / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    spec: dict[str, Any] = {
        "name": name, "model": str(model), "engine": ENGINE, "sampling": SAMPLING,
        "inputs": {"path": "inputs.jsonl", "template": "Claim: {claim}\nVerdict:", "id_field": "id"},
        "batch_size": batch_size, "output": "out/results.jsonl"}
    (tmp / "wl.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "wl.yaml"


def expected(model: Path, n: int, tmp: Path) -> list[str]:
    """vLLM's own LLM.generate on the first ``n`` rows (computed once per session for the
    largest n asked for; greedy texts do not depend on which other prompts ran beside)."""
    return reference_texts(model, prompts(N_REFERENCE), ENGINE, SAMPLING, tmp)[:n]


N_REFERENCE = 1200


def assert_exactly_once_and_identical(output: Path, texts: list[str]) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in rows(len(texts))]  # each row once, in order
    assert all(x["error"] is None for x in lines), [x for x in lines if x["error"]][:3]
    bad = [(x["id"], x["text"], e) for x, e in zip(lines, texts) if x["text"] != e]
    assert not bad, bad[:3]
    return lines


def db(state_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(state_dir / "pcm.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def wait_for(what: str, cond: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(every)  # polling a condition with a deadline, not sleeping to synchronise


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
