"""Bad workload files: exit code 2, a message naming the field, nothing submitted."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from pcm_service.cli import app
from pcm_service.workload import load_workload
from tests.support.serve import ServeProcess
from tests.support.workloads import WriteWorkload

runner = CliRunner()


def submit(path: Path, url: str, token_file: Path | None = None) -> Result:
    return runner.invoke(app, ["submit", str(path), "--service", url,
                               *(["--token-file", str(token_file)] if token_file else [])])


def workload_count(serve: ServeProcess) -> int:
    return len(serve.client().request("GET", "/status")["workloads"])


BAD_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "malformed yaml": (dict(raw="name: [unclosed\nbatch_size: 3\n"), "(yaml)"),
    "unknown top-level field": (dict(colour="blue"), "colour: unknown field"),
    "unknown engine field": (dict(engine={"dtype": "float32", "warp_drive": 1}), "engine.warp_drive: unknown field"),
    "missing model directory": (dict(model="no-such-model"), "model: model directory"),
    "missing input file": (dict(inputs={"path": "nope.jsonl", "prompt_field": "claim"}), "inputs.path: input file"),
    "template field absent from a row": (dict(inputs={"path": "inputs.jsonl", "template": "{claim} {source}"}),
                                         "inputs.template: inputs.jsonl line 1 has no field 'source'"),
    "batch_size zero": (dict(batch_size=0), "batch_size: Input should be greater than 0"),
    "batch_size negative": (dict(batch_size=-3), "batch_size: Input should be greater than 0"),
    "missing batch_size": (dict(batch_size=None), "batch_size"),
    "both prompt sources": (dict(inputs={"path": "inputs.jsonl", "template": "{claim}", "prompt_field": "claim"}),
                            "inputs: give exactly one of prompt_field, template or messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_workload_exits_2_names_field_submits_nothing(case: str, write_workload: WriteWorkload,
                                                          serve: ServeProcess) -> None:
    overrides, expected = BAD_CASES[case]
    path = write_workload(**overrides)
    result = submit(path, serve.url, serve.api_token_file)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert workload_count(serve) == 0


def test_duplicate_row_ids_rejected(write_workload: WriteWorkload) -> None:
    path = write_workload(rows=[{"id": "a", "claim": "x"}, {"id": "a", "claim": "y"}])
    with pytest.raises(ValueError, match="inputs.id_field: inputs.jsonl line 2 repeats row id 'a'"):
        load_workload(path)


def test_invalid_jsonl_line_named(write_workload: WriteWorkload, tmp_path: Path) -> None:
    path = write_workload()
    (tmp_path / "inputs.jsonl").write_text('{"id": "a", "claim": "x"}\n{not json}\n')
    with pytest.raises(ValueError, match="inputs.path: inputs.jsonl line 2 is not valid JSON"):
        load_workload(path)


def test_good_workload_is_submitted(write_workload: WriteWorkload, serve: ServeProcess) -> None:
    path = write_workload()
    result = submit(path, serve.url, serve.api_token_file)
    assert result.exit_code == 0, result.output
    status = serve.client().request("GET", "/status")
    [wl] = status["workloads"]
    assert wl["rows_total"] == 20 and wl["rows_done"] == 0
    assert wl["output"] == str(path.parent / "out" / "results.jsonl")


def test_prompt_field_and_default_ids(write_workload: WriteWorkload) -> None:
    path = write_workload(rows=[{"text": "hello"}, {"text": "world", "custom_id": "c-1"}],
                          inputs={"path": "inputs.jsonl", "prompt_field": "text"})
    sub = load_workload(path)
    assert [(r.row_id, r.prompt) for r in sub.rows] == [("0", "hello"), ("c-1", "world")]


def test_submit_to_unreachable_service_says_what_to_do(write_workload: WriteWorkload) -> None:
    result = submit(write_workload(), "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "pcm serve" in result.output
