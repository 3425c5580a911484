"""Bad OpenAI batch files, refused as OpenAI refuses them: through the API a batch that ends
`failed` with the line, parameter and code in `errors` and nothing run; through the CLI
exit 2 naming the line and field, before anything is submitted. No engine runs here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import openai
import pytest

from pcm_service.batchapi.lines import check_batch_file
from pcm_service.protocol import NamedModel
from tests.support import REPO
from tests.support.models import fake_model
from tests.support.openai_batch import COMPLETIONS, chat_body, line, write_lines
from tests.support.serve import ServeProcess
from tests.support.state import db
from tests.support.waiting import wait_for

MODEL = "m"


def good(n: int, model: str = MODEL) -> list[dict[str, Any]]:
    return [line(f"r{i}", chat_body(model, f"claim {i}", max_tokens=4)) for i in range(n)]


def malformed_80_of_157() -> list[Any]:
    lines: list[Any] = good(157)
    lines[79] = '{"custom_id": "r79", "method": "POST", "url": '  # cut short: not JSON
    return lines


def with_field(i: int, **fields: Any) -> Callable[[], list[dict[str, Any]]]:
    def make() -> list[dict[str, Any]]:
        lines = good(5)
        lines[i]["body"].update(fields)
        return lines
    return make


def edit(i: int, f: Callable[[dict[str, Any]], None]) -> Callable[[], list[dict[str, Any]]]:
    def make() -> list[dict[str, Any]]:
        lines = good(5)
        f(lines[i])
        return lines
    return make


# (file, expected errors as (line, code, param))
BAD_FILES: dict[str, tuple[Callable[[], list[Any]], list[tuple[int, str, str]]]] = {
    "duplicate_custom_id": (edit(3, lambda x: x.update(custom_id="r1")), [(4, "duplicate_custom_id", "custom_id")]),
    "wrong_url": (edit(2, lambda x: x.update(url=COMPLETIONS)), [(3, "invalid_url", "url")]),
    "unknown_url": (edit(2, lambda x: x.update(url="/v1/embeddings")), [(3, "invalid_url", "url")]),
    "mixed_models": (edit(4, lambda x: x["body"].update(model="other")), [(5, "mismatched_model", "body.model")]),
    "malformed_line_80_of_157": (malformed_80_of_157, [(80, "invalid_json_line", "")]),
    "no_custom_id": (edit(1, lambda x: x.pop("custom_id")), [(2, "missing_required_parameter", "custom_id")]),
    "no_messages": (edit(0, lambda x: x["body"].pop("messages")), [(1, "invalid_request", "body.messages")]),
    "unsupported_field": (with_field(2, tools=[]), [(3, "unsupported_parameter", "body.tools")]),
    "streaming": (with_field(1, stream=True), [(2, "streaming_unsupported", "body.stream")]),
    "bad_temperature": (with_field(3, temperature="hot"), [(4, "invalid_type", "body.temperature")]),
    "unknown_model": (lambda: good(3, "nobody"), [(1, "model_not_found", "body.model")]),
}


@pytest.fixture
def api(serve: ServeProcess, tmp_path: Path) -> openai.OpenAI:
    serve.client().request("POST", "/served-models", NamedModel(name=MODEL, path=str(fake_model(tmp_path / "m"))))
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key=serve.api_token, max_retries=0)


def write(tmp: Path, name: str, lines: list[Any]) -> Path:
    (tmp / f"{name}.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return tmp / f"{name}.jsonl"


def no_workloads(serve: ServeProcess) -> bool:
    with db(serve.state_dir) as conn:
        return conn.execute("SELECT COUNT(*) FROM workloads").fetchone()[0] == 0 and \
            conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 0


def failed_batch(api: openai.OpenAI, path: Path) -> Any:
    with path.open("rb") as fh:
        f = api.files.create(file=fh, purpose="batch")
    b = api.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "validating"  # a well-formed create request is answered at once
    return wait_for(lambda: (x := api.batches.retrieve(b.id)).status != "validating" and x, 30, "validation")


def test_bad_files_end_failed_with_line_and_code_and_nothing_runs(serve: ServeProcess, api: openai.OpenAI,
                                                                  tmp_path: Path) -> None:
    for name, (make, expected) in BAD_FILES.items():
        batch = failed_batch(api, write(tmp_path, name, make()))
        assert batch.status == "failed" and batch.failed_at is not None, name
        got = [(e.line, e.code, e.param or "") for e in batch.errors.data]
        assert got == expected, (name, [e.message for e in batch.errors.data])
    assert no_workloads(serve)


def test_chat_lines_for_a_model_without_a_chat_template(serve: ServeProcess, api: openai.OpenAI,
                                                        tmp_path: Path) -> None:
    batch = failed_batch(api, write(tmp_path, "chat", good(3)))  # the stand-in model has no tokenizer
    assert batch.status == "failed"
    (err,) = batch.errors.data
    assert (err.line, err.code, err.param) == (1, "invalid_request", "body.messages") and "chat template" in err.message
    assert no_workloads(serve)


def test_requests_refused_at_once(serve: ServeProcess, api: openai.OpenAI, tmp_path: Path) -> None:
    with write(tmp_path, "ok", good(2)).open("rb") as fh:
        f = api.files.create(file=fh, purpose="batch")
    assert [x.id for x in api.files.list()] == [f.id] and api.files.retrieve(f.id).bytes == f.bytes
    assert api.files.content(f.id).content == (tmp_path / "ok.jsonl").read_bytes()
    for kw, param in (({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "1h"}, "completion_window"),
                      ({"metadata": {"k": 1}}, "metadata.k")):
        args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **kw}
        with pytest.raises(openai.BadRequestError) as e:
            api.batches.create(**args)  # type: ignore[arg-type]
        assert e.value.body["param"] == param, e.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="Must be .jsonl"):
        api.files.create(file=("notes.txt", b"hello"), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_nobody")
    first = api.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    missing = api.batches.create(input_file_id="file-nobody", endpoint="/v1/chat/completions", completion_window="24h")
    missing = wait_for(lambda: (x := api.batches.retrieve(missing.id)).status != "validating" and x, 30, "validation")
    assert missing.status == "failed" and missing.errors.data[0].param == "input_file_id"
    with pytest.raises(openai.ConflictError, match="status 'failed'"):
        api.batches.cancel(missing.id)
    assert api.files.delete(f.id).deleted and [x.id for x in api.files.list()] == []
    with pytest.raises(openai.NotFoundError):
        api.files.content(f.id)
    assert [m.id for m in api.models.list()] == [MODEL]
    page = api.batches.list(limit=1)
    assert len(page.data) == 1 and page.has_more and page.data[0].id == missing.id  # newest first
    assert [b.id for b in api.batches.list(limit=1, after=missing.id)] == [first.id]
    assert [b.id for b in api.batches.list()] == [missing.id, first.id]
    assert no_workloads(serve)


def pcm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcm_service.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_cli_exits_2_naming_the_line_and_field_and_submits_nothing(serve: ServeProcess, api: openai.OpenAI,
                                                                   tmp_path: Path) -> None:
    conn = ("--service", serve.url, "--token-file", str(serve.api_token_file))
    for name, (make, expected) in BAD_FILES.items():
        if name == "unknown_model":
            continue  # the CLI does not know the service's models: see below
        (lineno, code, param) = expected[0]
        r = pcm("submit", str(write(tmp_path, name, make())), *conn)
        assert r.returncode == 2, (name, r.stderr)
        assert f"line {lineno}: {code}" in r.stderr and (param in r.stderr), (name, r.stderr)
    r = pcm("submit", str(write(tmp_path, "unknown", good(3, "nobody"))), *conn)
    assert r.returncode == 2 and "nobody" in r.stderr and "pcm model list" in r.stderr, r.stderr
    r = pcm("submit", str(write(tmp_path, "chat", good(3))), *conn)  # the stand-in model has no chat template
    assert r.returncode == 2 and "chat template" in r.stderr, r.stderr
    r = pcm("run", str(write(tmp_path, "norun", good(3))))
    assert r.returncode == 2 and "--model DIR" in r.stderr, r.stderr
    assert no_workloads(serve)


def test_line_checks_report_every_line_with_its_number(tmp_path: Path) -> None:
    lines: list[Any] = good(6)
    lines[1] = "not json"
    lines[3]["body"]["n"] = 0
    lines[5]["body"]["response_format"] = {"type": "json_schema", "json_schema": {"name": "x"}}
    summary = check_batch_file(write(tmp_path, "many", lines))
    assert [(e.line, e.code, e.param) for e in summary.errors] == [
        (2, "invalid_json_line", None), (4, "invalid_value", "body.n"),
        (6, "missing_required_parameter", "body.response_format.json_schema.schema")]
    ok = good(2)
    ok[0]["body"].update(response_format={"type": "json_object"}, logprobs=True, top_logprobs=3, stop="x",
                         max_completion_tokens=9, max_tokens=2)
    summary = check_batch_file(write_lines(tmp_path / "ok.jsonl", ok))
    assert summary.errors == [] and summary.model == MODEL and summary.has_chat
