"""The state directory is 0700 and every file in it 0600 (the SQLite database with its WAL and
SHM files, the token files, OpenAI uploads under files/) whatever the umask `pcm serve` starts
under (issue 28, item 6)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx

from pcm_service.protocol import SubmitResponse, WorkerRegistration, WorkloadSubmission
from tests.support.models import fake_model
from tests.support.serve import ServeProcess


def modes(state: Path) -> dict[str, str]:
    """Every entry under ``state`` (itself included) and its permission bits, e.g. ``0o600``."""
    found = {".": oct(stat.S_IMODE(state.stat().st_mode))}
    for p in state.rglob("*"):
        found[str(p.relative_to(state))] = oct(stat.S_IMODE(p.lstat().st_mode))
    return found


def wanted(state: Path, found: dict[str, str]) -> dict[str, str]:
    return {name: "0o700" if (state / name).is_dir() else "0o600" for name in found}


def test_state_dir_0700_and_files_0600_under_umask_022(tmp_path: Path) -> None:
    old = os.umask(0o022)  # what most accounts have: files 0644, directories 0755 unless we say
    try:
        serve = ServeProcess(tmp_path / "state").start()  # the umask is inherited by `pcm serve`
    finally:
        os.umask(old)
    try:
        model = fake_model(tmp_path / "model")
        sub = WorkloadSubmission.model_validate({
            "name": "perm", "context": {"model": str(model)}, "batch_size": 1,
            "output": str(tmp_path / "out.jsonl"), "rows": [{"row_id": "a", "prompt": "p"}]})
        client = serve.client()
        try:
            client.request("POST", "/workloads", sub, SubmitResponse)
        finally:
            client.close()
        serve.join(WorkerRegistration(host="node-1", pid=1))
        line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "p"}}
        upload = httpx.post(f"{serve.url}/v1/files", headers={"Authorization": f"Bearer {serve.api_token}"},
                            files={"file": ("in.jsonl", json.dumps(line).encode())}, data={"purpose": "batch"})
        assert upload.status_code == 200, upload.text
        found = modes(serve.state_dir)
        assert {"pcm.sqlite3", "pcm.sqlite3-wal", "pcm.sqlite3-shm", "api.token", "pool.token",
                "metrics.token", "files", f"files/{upload.json()['id']}.jsonl"} <= set(found), found
        assert found == wanted(serve.state_dir, found)
    finally:
        serve.stop()
    found = modes(serve.state_dir)  # after a clean stop too (SQLite checkpoints and removes the WAL)
    assert found == wanted(serve.state_dir, found)
    # a state directory an older PCM left open to others is tightened when the service starts
    serve.state_dir.chmod(0o755)
    (serve.state_dir / "pcm.sqlite3").chmod(0o644)
    serve.start()
    try:
        found = modes(serve.state_dir)
        assert found == wanted(serve.state_dir, found)
    finally:
        serve.stop()
