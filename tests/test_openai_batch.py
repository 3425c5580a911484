"""The official `openai` client against a real `pcm serve` and a real worker on the vLLM CPU
engine: Files and Batches end to end, per-line sampling equal to vLLM's answer for that line
alone, chat rows rendered with the model's template, and a cancel in the middle of a batch."""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import yaml
from openai.types import Batch, Completion
from openai.types.chat import ChatCompletion

from tests.support import REPO
from tests.support.models import ENGINE
from tests.support.openai_batch import (
    COMPLETIONS,
    chat_body,
    line,
    read_jsonl,
    reference_choices,
    write_lines,
)
from tests.support.serve import ServeProcess
from tests.support.state import db
from tests.support.waiting import wait_for

pytestmark = pytest.mark.engine
MODEL = "tiny-chat"
FINAL = ("completed", "failed", "cancelled", "expired")


@dataclass
class Pool:
    serve: ServeProcess
    client: openai.OpenAI
    worker: subprocess.Popen[bytes]


def pcm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcm_service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def pool(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("openai")
    serve = ServeProcess(tmp / "state", "--heartbeat-interval", "1").start()
    api = ("--service", serve.url, "--token-file", str(serve.api_token_file))
    engine_args = [a for k, v in ENGINE.items() for a in ("--engine-arg", f"{k}={v}")]
    added = pcm("model", "add", MODEL, str(tiny_model), *engine_args, *api)
    assert added.returncode == 0, added.stderr
    listed = pcm("model", "list", *api)
    assert listed.stdout.startswith(f"{MODEL}\t{tiny_model}"), listed.stdout
    with (tmp / "worker.log").open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pcm_service.cli", "worker", "--service", serve.url,
             "--token-file", str(serve.pool_token_file), "--work-dir", str(tmp / "w"), "--idle-timeout", "600"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key=serve.api_token, max_retries=0)
    yield Pool(serve, client, worker)
    worker.terminate()
    worker.wait(60)
    serve.stop()


def run_batch(pool: Pool, path: Path, endpoint: str = "/v1/chat/completions", timeout: float = 600) -> Batch:
    with path.open("rb") as fh:
        f = pool.client.files.create(file=fh, purpose="batch")
    assert f.filename == path.name and f.bytes == path.stat().st_size
    batch = pool.client.batches.create(input_file_id=f.id, endpoint=endpoint,  # type: ignore[arg-type]
                                       completion_window="24h", metadata={"test": path.stem})
    assert batch.status == "validating" and batch.metadata == {"test": path.stem}
    return wait_for(lambda: (b := pool.client.batches.retrieve(batch.id)).status in FINAL and b,
                    timeout, f"batch {path.name} to finish")


def completed(pool: Pool, batch_id: str) -> int:
    counts = pool.client.batches.retrieve(batch_id).request_counts
    return counts.completed if counts else 0


def texts(body: dict[str, Any]) -> list[str | None]:
    if body["object"] == "chat.completion":
        return [c.message.content for c in ChatCompletion.model_validate(body).choices]
    return [c.text for c in Completion.model_validate(body).choices]


def test_each_line_gets_what_vllm_gives_that_line_alone(pool: Pool, tiny_model: Path, tmp_path: Path) -> None:
    """Lines differ in max_tokens, temperature/seed, stop, n and response_format (vLLM's
    structured outputs); one is too long for the engine; every other one equals `LLM.chat`
    for that line alone."""
    lines = []
    for i in range(24):
        sampling: dict[str, Any] = {"max_tokens": 3 + i % 8, "temperature": 0}
        if i % 4 == 1:
            sampling.update(temperature=0.9, seed=100 + i)
        if i % 4 == 2:
            sampling["stop"] = ["e", "a"]
        if i % 6 == 3:
            sampling.update(n=3, temperature=0.8, seed=7 * i)
        lines.append(line(f"req-{i}", chat_body(MODEL, f"Claim {i}: the river flows north.", **sampling)))
    schema = {"type": "object", "properties": {"verdict": {"enum": ["True", "False"]}}, "required": ["verdict"]}
    lines.append(line("json-schema", chat_body(MODEL, "Claim: x.", max_tokens=12, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})))
    lines.append(line("json-object", chat_body(MODEL, "Claim: y.", max_tokens=12, temperature=0,
                                               response_format={"type": "json_object"})))
    lines.append(line("too-long", chat_body(MODEL, "word " * 400, max_tokens=4)))
    batch_file = write_lines(tmp_path / "chat.jsonl", lines)

    batch = run_batch(pool, batch_file)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (27, 26, 1)
    assert batch.output_file_id and batch.error_file_id and batch.completed_at and batch.in_progress_at

    out = read_jsonl(pool.client.files.content(batch.output_file_id).text)
    errors = read_jsonl(pool.client.files.content(batch.error_file_id).text)
    assert sorted(x["custom_id"] for x in out) == sorted([f"req-{i}" for i in range(24)] + ["json-schema",
                                                                                          "json-object"])
    assert [x["custom_id"] for x in errors] == ["too-long"]
    assert errors[0]["response"]["status_code"] == 400 and "maximum context length" in \
        errors[0]["response"]["body"]["error"]["message"]
    assert all(x["id"].startswith("batch_req_") and x["response"]["status_code"] == 200 and x["error"] is None
               for x in out)
    assert all(x["response"]["body"]["model"] == MODEL for x in out)
    reference = reference_choices(tiny_model, ENGINE, write_lines(tmp_path / "ok.jsonl", lines[:-1]), tmp_path)
    got = {x["custom_id"]: texts(x["response"]["body"]) for x in out}
    assert got == reference
    assert len(got["req-3"]) == 3 and all(len(v) == 1 for k, v in got.items() if k not in ("req-3", "req-9",
                                                                                          "req-15", "req-21"))
    schema_text = got["json-schema"][0]
    assert schema_text is not None and schema_text.startswith("{")  # constrained from the first token on
    usage = {x["custom_id"]: x["response"]["body"]["usage"] for x in out}
    assert usage["req-0"]["completion_tokens"] <= 3 and usage["req-0"]["prompt_tokens"] > 10


def test_completions_and_logprobs(pool: Pool, tiny_model: Path, tmp_path: Path) -> None:
    lines = [line(f"c{i}", {"model": MODEL, "prompt": f"Claim: {i} is odd.\nVerdict:", "max_tokens": 5,
                            "temperature": 0, "logprobs": 2}, COMPLETIONS) for i in range(6)]
    batch = run_batch(pool, write_lines(tmp_path / "cmpl.jsonl", lines), COMPLETIONS)
    assert batch.status == "completed" and batch.error_file_id is None and batch.output_file_id
    out = read_jsonl(pool.client.files.content(batch.output_file_id).text)
    reference = reference_choices(tiny_model, ENGINE, tmp_path / "cmpl.jsonl", tmp_path)
    assert {x["custom_id"]: texts(x["response"]["body"]) for x in out} == reference
    for x in out:
        choice = Completion.model_validate(x["response"]["body"]).choices[0]
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert len(choice.logprobs.token_logprobs) == x["response"]["body"]["usage"]["completion_tokens"]
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs or [])


def test_a_chat_workload_yaml_fills_its_message_templates(pool: Pool, tiny_model: Path, tmp_path: Path) -> None:
    claims = [{"id": f"k{i}", "claim": f"Claim {i} is about rivers."} for i in range(10)]
    (tmp_path / "claims.jsonl").write_text("".join(f'{{"id": "{c["id"]}", "claim": "{c["claim"]}"}}\n'
                                                   for c in claims))
    spec = {"name": "chat-yaml", "model": str(tiny_model), "engine": ENGINE,
            "sampling": {"temperature": 0, "max_tokens": 6},
            "inputs": {"path": "claims.jsonl", "id_field": "id", "messages": [
                {"role": "system", "content": "You check claims."}, {"role": "user", "content": "{claim}"}]},
            "batch_size": 4, "output": "out.jsonl"}
    (tmp_path / "wl.yaml").write_text(yaml.safe_dump(spec))
    done = pcm("submit", str(tmp_path / "wl.yaml"), "--service", pool.serve.url, "--token-file",
               str(pool.serve.api_token_file), "--wait", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_jsonl((tmp_path / "out.jsonl").read_text())
    same = write_lines(tmp_path / "same.jsonl", [line(c["id"], chat_body(MODEL, c["claim"], max_tokens=6,
                                                                          temperature=0)) for c in claims])
    reference = reference_choices(tiny_model, ENGINE, same, tmp_path)
    assert {r["id"]: [r["text"]] for r in rows} == reference


def test_cancel_stops_leasing_and_keeps_the_finished_rows(pool: Pool, tmp_path: Path) -> None:
    n_rows = 1200
    # more rows than the worker keeps in flight (twice its engine's max_num_seqs: 512 here), so
    # some are still queued when the cancel comes
    lines = [line(f"slow-{i}", chat_body(MODEL, f"Claim {i}.", max_tokens=48, min_tokens=48, temperature=0))
             for i in range(n_rows)]
    with write_lines(tmp_path / "slow.jsonl", lines).open("rb") as fh:
        f = pool.client.files.create(file=fh, purpose="batch")
    batch = pool.client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
    wait_for(lambda: completed(pool, batch.id) >= 16, 600, "the first rows of the slow batch")
    cancelling = pool.client.batches.cancel(batch.id)
    acked = time.time()
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = wait_for(lambda: (b := pool.client.batches.retrieve(batch.id)).status in FINAL and b, 300,
                    "the cancel to finish")
    assert done.status == "cancelled" and done.cancelled_at is not None
    with pytest.raises(openai.ConflictError):
        pool.client.batches.cancel(batch.id)

    assert done.output_file_id and done.error_file_id and done.request_counts is not None
    out = read_jsonl(pool.client.files.content(done.output_file_id).text)
    errors = read_jsonl(pool.client.files.content(done.error_file_id).text)
    assert len(out) == done.request_counts.completed >= 16 and len(out) + len(errors) == n_rows
    assert {x["custom_id"] for x in out} | {x["custom_id"] for x in errors} == {x["custom_id"] for x in lines}
    assert all(x["response"] is None and x["error"]["code"] == "batch_cancelled" for x in errors)
    with db(pool.serve.state_dir) as conn:  # nothing of it was leased after the cancel was answered
        wl = conn.execute("SELECT workload_id FROM openai_batches WHERE batch_id=?", (batch.id,)).fetchone()[0]
        last_lease = conn.execute("SELECT MAX(leased_at) FROM batches WHERE workload_id=?", (wl,)).fetchone()[0]
    assert last_lease < acked


def test_pcm_run_takes_an_openai_batch_file_and_a_model_directory(tiny_model: Path, tmp_path: Path) -> None:
    lines = [line(f"q{i}", chat_body("any-name", f"Claim {i}.", max_tokens=4 + i, temperature=0)) for i in range(6)]
    lines.append(line("too-long", chat_body("any-name", "word " * 400, max_tokens=4)))
    batch_file = write_lines(tmp_path / "run.jsonl", lines)
    engine_args = [a for k, v in ENGINE.items() for a in ("--engine-arg", f"{k}={v}")]
    done = pcm("run", str(batch_file), "--model", str(tiny_model), *engine_args, "--batch-size", "2",
               "--state-dir", str(tmp_path / "state"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "run.output.jsonl")
    out = read_jsonl((tmp_path / "run.output.jsonl").read_text())
    errors = read_jsonl((tmp_path / "run.errors.jsonl").read_text())
    assert [x["custom_id"] for x in out] == [f"q{i}" for i in range(6)] and [x["custom_id"] for x in errors] == \
        ["too-long"]
    bodies = [ChatCompletion.model_validate(x["response"]["body"]) for x in out]
    assert all(b.model == "any-name" and b.usage and b.usage.completion_tokens <= 4 + i
               for i, b in enumerate(bodies))
