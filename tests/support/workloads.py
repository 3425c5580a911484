"""Workload files for tests: claims against a stand-in model (``write_claims``), and the
engine workload the churn, eviction, scaling and TLS tests share, with its checks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.support.models import ENGINE, fake_model, reference_texts

WriteWorkload = Callable[..., Path]  # conftest's write_workload fixture: write_claims into tmp_path


def write_claims(tmp_path: Path, rows: list[dict[str, Any]] | None = None, model: str | Path = "model",
                 raw: str | None = None, name: str = "wl.yaml", inputs_file: str = "inputs.jsonl",
                 **fields: Any) -> Path:
    """A workload YAML (+ its JSONL inputs) in ``tmp_path``: claims to verify, by default with a
    model directory that passes validation (no engine starts from it); ``fields`` replace fields."""
    if rows is None:
        rows = [{"id": f"r{i}", "claim": f"Claim number {i} is true."} for i in range(20)]
    (tmp_path / inputs_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if model == "model":  # a directory that passes validation (no engine is started from it)
        fake_model(tmp_path / "model")
    spec: dict[str, Any] = {
        "name": "test", "model": str(model), "engine": dict(ENGINE),
        "sampling": {"temperature": 0, "max_tokens": 8},
        "inputs": {"path": inputs_file, "template": "Claim: {claim}\nVerdict:", "id_field": "id"},
        "batch_size": 5, "output": "out/results.jsonl",
    }
    spec.update(fields)
    path = tmp_path / name
    path.write_text(raw if raw is not None else yaml.safe_dump(spec))
    return path


# every row generates exactly 128 tokens: at ~70 tokens/s per row (64 rows in flight on 2
# cores) a row takes ~2 s, longer than a worker's drain timeout (1 s)
SAMPLING = {"temperature": 0, "max_tokens": 128, "min_tokens": 128}


def rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"q{i:04d}", "claim": f"Statement {i}: the river {i % 7} flows past town {i % 13}."}
            for i in range(n)]


def prompts(n: int) -> list[str]:
    return [f"Claim: {r['claim']}\nVerdict:" for r in rows(n)]


def write_engine_workload(tmp: Path, model: Path, n: int, batch_size: int = 10, name: str = "churn") -> Path:
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
    bad = [(x["id"], x["text"], e) for x, e in zip(lines, texts, strict=True) if x["text"] != e]
    assert not bad, bad[:3]
    return lines
