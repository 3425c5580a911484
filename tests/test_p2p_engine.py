"""Two real workers on the vLLM CPU engine: the second gets its weights from the first."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pcm_service.protocol import ORIGIN, ServiceStatus, SubmitResponse, WorkloadState, WorkloadStatus
from pcm_service.workload import load_workload
from tests.support import REPO
from tests.support.models import ENGINE, reference_texts
from tests.support.serve import ServeProcess
from tests.support.waiting import wait_for
from tests.support.workloads import write_claims
from tests.test_end_to_end import BAD_ROW, rows

pytestmark = pytest.mark.engine
TOKEN = "p2p-engine-test-token"
SAMPLING = {"temperature": 0, "max_tokens": 12}


def good_rows() -> list[dict[str, str]]:
    return [r for i, r in enumerate(rows()) if i != BAD_ROW]


def write_workload(tmp: Path, name: str, model: Path, batch: list[dict[str, str]]) -> Path:
    return write_claims(tmp, rows=batch, model=model, name=f"{name}.yaml", inputs_file=f"{name}.jsonl",
                        engine=ENGINE, sampling=SAMPLING, batch_size=10, output=f"out/{name}.jsonl")


def test_second_worker_loads_weights_copied_from_the_first(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    os.chmod(tmp_path / "token", 0o600)
    serve = ServeProcess(tmp_path / "state", "--pool-token-file", str(tmp_path / "token"),
                         "--chunk-size", "0.25").start()  # 256 KiB: the model is several chunks
    client = serve.client()
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker(name: str) -> None:
        # as many downloads as a peer has upload slots: a free peer slot is always there, so
        # the origin (used only when no peer has one) is not needed once the first holds it
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "pcm_service.cli", "worker", "--service", serve.url,
             "--token-file", str(tmp_path / "token"), "--work-dir", str(tmp_path / name),
             "--idle-timeout", "600", "--fetch-parallel", "2", "--upload-slots", "2",
             "--target-rows", "32"],  # leaves rows queued for the second worker
            stdout=(tmp_path / f"{name}.log").open("wb"), stderr=subprocess.STDOUT, cwd=REPO))

    def submit(path: Path) -> str:
        return client.request("POST", "/workloads", load_workload(path), SubmitResponse).workload_id

    def done(wl: str) -> bool:
        st = client.request("GET", f"/workloads/{wl}", None, WorkloadStatus)
        return st.state == WorkloadState.COMPLETED

    def status() -> ServiceStatus:
        return client.request("GET", "/status", None, ServiceStatus)

    try:
        start_worker("w1")
        first = submit(write_workload(tmp_path, "first", tiny_model, good_rows()[:20]))
        wait_for(lambda: done(first), 600, "the first worker to finish the first workload")
        start_worker("w2")
        wait_for(lambda: len(status().workers) == 2, 600, "the second worker to register")
        # enough rows that the second worker is assigned the context while work is queued
        again = [{"id": f"{r['id']}-{k}", "claim": r["claim"]} for k in range(3) for r in good_rows()]
        second = submit(write_workload(tmp_path, "second", tiny_model, again))
        w1, w2 = [w.worker_id for w in status().workers]
        wait_for(lambda: done(second) and next(w for w in status().workers if w.worker_id == w2)
                 .library_starts == 1, 600, "the second workload and the second worker's engine")

        db = sqlite3.connect(serve.state_dir / "pcm.sqlite3")
        sources = {w: {r[0] for r in db.execute("SELECT source FROM transfers WHERE worker_id=? AND ok=1",
                                                (w,))} for w in (w1, w2)}
        assert sources == {w1: {ORIGIN}, w2: {w1}}, sources  # the second fetched only from the first
        states = [r[0] for r in db.execute("SELECT state FROM library_events WHERE worker_id=?"
                                           " ORDER BY event_id", (w2,))]
        assert states == ["fetching", "cached", "loading", "ready"], states
        copy = next((tmp_path / "w2" / "models").iterdir())
        originals = sorted(p.name for p in tiny_model.iterdir() if p.is_file())
        assert originals == sorted(p.name for p in copy.iterdir() if not p.name.startswith(".pcm-"))
        assert all((copy / n).read_bytes() == (tiny_model / n).read_bytes() for n in originals)
        ctx_files = list((tmp_path / "w2").glob("ctx-*.json"))
        assert [json.loads(f.read_text())["model"] for f in ctx_files] == [str(copy)]  # loaded from it

        prompts = [f"Claim: {r['claim']}\nVerdict:" for r in good_rows()]
        expected = dict(zip(prompts, reference_texts(tiny_model, prompts, ENGINE, SAMPLING, tmp_path), strict=True))
        for name, batch in (("first", good_rows()[:20]), ("second", again)):
            out = [json.loads(x) for x in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
            assert [o["id"] for o in out] == [r["id"] for r in batch]
            wrong = [(o["id"], o["text"]) for o, r in zip(out, batch, strict=True)
                     if o["text"] != expected[f"Claim: {r['claim']}\nVerdict:"]]
            assert not wrong, wrong[:3]
    finally:
        for p in workers:
            p.terminate()
        for p in workers:
            p.wait(60)
        serve.stop()
