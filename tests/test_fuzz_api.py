"""Schemathesis against a real `pcm serve`, from the service's own OpenAPI document, with its
tokens and two workers' credentials (tests/fuzz/hooks.py gives each operation the one it
documents; worker routes name either worker, always with worker A's credential) and every check:
no 5xx, no schema-violating request accepted, no schema-valid one refused without a reason
(400/404), no undocumented status code or header, 405 with Allow, auth enforced, and no
rejected request changes the SQLite state (compared before and after each one), and no request
with worker A's credential changes anything of worker B's. Two seeds, one after the other."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from pcm_service.protocol import (
    ContextSpec,
    ContextState,
    LeaseRequest,
    LeaseResponse,
    LibraryEvent,
    RowIn,
    SubmitResponse,
    WorkerRegistration,
    WorkloadSubmission,
)
from tests.support import REPO
from tests.support.models import fake_model
from tests.support.serve import ServeProcess

FUZZ = REPO / "tests" / "fuzz"
SEEDS = (1, 2)
MAX_EXAMPLES = 50  # per operation and seed


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    # no heartbeat ever times out here: the reaper must not change the state between two snapshots
    serve = ServeProcess(tmp_path / "state", "--worker-timeout", "1000000", "--heartbeat-interval", "1000",
                         model_roots=[tmp_path / "models"])
    (tmp_path / "models").mkdir()
    serve.start()
    # work, and two workers on it: B holds a batch, and must keep it whatever A's credential does
    sub: SubmitResponse = serve.client().request("POST", "/workloads", WorkloadSubmission(
        name="fuzz", context=ContextSpec(model=str(fake_model(tmp_path / "models" / "m"))), batch_size=2,
        output=str(tmp_path / "out.jsonl"), rows=[RowIn(row_id=str(i), prompt="p") for i in range(40)]),
        SubmitResponse)
    workers = []
    for host in ("a", "b"):
        wid, own = serve.join(WorkerRegistration(host=host, pid=1))
        own.request("POST", f"/workers/{wid}/lease", LeaseRequest(max_batches=0), LeaseResponse)
        own.request("POST", f"/workers/{wid}/library", LibraryEvent(context_id=sub.context_id,
                                                                   state=ContextState.READY))
        workers.append([wid, own._headers["authorization"][7:]])
    assert own.request("POST", f"/workers/{wid}/lease", LeaseRequest(
        context_id=sub.context_id, context_state=ContextState.READY, max_batches=1), LeaseResponse).batches
    checked = tmp_path / "checked.log"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "hooks", "PYTHONPATH": str(FUZZ),
           "PCM_FUZZ_STATE": str(serve.state_dir / "pcm.sqlite3"), "PCM_FUZZ_CHECKED": str(checked),
           "PCM_FUZZ_POOL_TOKEN_FILE": str(serve.pool_token_file),
           "PCM_FUZZ_API_TOKEN_FILE": str(serve.api_token_file), "PCM_FUZZ_WORKERS": json.dumps(workers)}
    doc = httpx.get(f"{serve.url}/openapi.json").json()
    operations = sum(len(ops) for ops in doc["paths"].values())
    try:
        for seed in SEEDS:
            t0 = time.monotonic()
            run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{serve.url}/openapi.json",
                                  "--checks", "all", "--workers", "1", "--seed", str(seed), "--no-color",
                                  "--generation-database", "none", "--max-examples", str(MAX_EXAMPLES)],
                                 cwd=FUZZ, env=env, capture_output=True, text=True, timeout=600)
            took = time.monotonic() - t0
            out = run.stdout + run.stderr
            assert run.returncode == 0, out[-6000:]
            m = re.search(r"(\d+) generated, (\d+) passed", out)
            assert m is not None, out[-3000:]
            generated, passed = int(m.group(1)), int(m.group(2))
            print(f"\nschemathesis seed {seed}: {generated} cases generated, {passed} passed, {took:.0f}s")
            assert generated == passed and generated >= 1000
            assert f"Tested: {operations}" in out, out[-3000:]  # every operation of the document
    finally:
        serve.stop()
    rejected = Counter(line.split()[0] for line in checked.read_text().splitlines())
    print(f"state compared around {sum(rejected.values())} rejected requests {dict(sorted(rejected.items()))}")
    # the state check ran on refusals of every kind the service gives
    assert {"400", "401", "403", "404", "409", "422"} <= set(rejected), rejected
    assert "Traceback" not in serve.log_path.read_text()
