"""Schemathesis against a real `pcm serve`, from the service's own OpenAPI document, with both
tokens (tests/fuzz/hooks.py gives each operation the one it documents) and every check:
no 5xx, no schema-violating request accepted, no schema-valid one refused without a reason
(400/404), no undocumented status code or header, 405 with Allow, auth enforced, and no
rejected request changes the SQLite state (compared before and after each one)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from support import REPO
from support.serve import ServeProcess

FUZZ = REPO / "tests" / "fuzz"


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    # no heartbeat ever times out here: the reaper must not change the state between two snapshots
    serve = ServeProcess(tmp_path / "state", "--worker-timeout", "1000000", "--heartbeat-interval", "1000",
                         model_roots=[tmp_path / "models"])
    (tmp_path / "models").mkdir()
    serve.start()
    checked = tmp_path / "checked.log"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "hooks", "PYTHONPATH": str(FUZZ),
           "PCM_FUZZ_STATE": str(serve.state_dir / "pcm.sqlite3"), "PCM_FUZZ_CHECKED": str(checked),
           "PCM_FUZZ_POOL_TOKEN_FILE": str(serve.pool_token_file),
           "PCM_FUZZ_API_TOKEN_FILE": str(serve.api_token_file)}
    doc = httpx.get(f"{serve.url}/openapi.json").json()
    operations = sum(len(ops) for ops in doc["paths"].values())
    t0 = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{serve.url}/openapi.json",
                              "--checks", "all", "--workers", "1", "--seed", "1", "--no-color",
                              "--generation-database", "none"],
                             cwd=FUZZ, env=env, capture_output=True, text=True, timeout=600)
    finally:
        serve.stop()
    took = time.monotonic() - t0
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m is not None, out[-3000:]
    generated, passed = int(m.group(1)), int(m.group(2))
    rejected = Counter(line.split()[0] for line in checked.read_text().splitlines())
    print(f"\nschemathesis: {generated} cases generated, {passed} passed, {took:.0f}s; state compared"
          f" around {sum(rejected.values())} rejected requests {dict(sorted(rejected.items()))}")
    assert generated == passed and generated >= 1000
    assert f"Tested: {operations}" in out, out[-3000:]  # every operation of the document
    # the state check ran on refusals of every kind the service gives
    assert {"400", "401", "404", "422"} <= set(rejected), rejected
    assert "Traceback" not in serve.log_path.read_text()
