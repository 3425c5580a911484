"""Model paths confined (a real `pcm serve`): only model directories under --model-root, never the
state directory or a token file, only regular files; a refused path registers nothing, and
no registered manifest ever holds a token or a state file."""
from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from pcm_service.protocol import ModelManifest
from tests.support.models import fake_model
from tests.support.serve import MODEL_ROOTS, ServeProcess


def count(serve: ServeProcess, table: str) -> int:
    with sqlite3.connect(serve.state_dir / "pcm.sqlite3") as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def submission(model: str) -> dict[str, object]:
    return {"name": "t", "context": {"model": model}, "batch_size": 1,
            "output": str(MODEL_ROOTS[0] / "pcm-never-written"), "rows": [{"row_id": "a", "prompt": "p"}]}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    fake_model(r / "good")
    fake_model(tmp_path / "outside")  # a real-looking model, but under no root
    (r / "escape").symlink_to(tmp_path / "outside")  # a link in the root that leads out of it
    os.mkfifo(fake_model(r / "fifo") / "weights.pipe")  # reading it would block the service
    (fake_model(r / "filelink") / "tokenizer.json").symlink_to(tmp_path / "outside" / "config.json")
    (r / "noweights").mkdir()
    (r / "noweights" / "config.json").write_text("{}")
    return r


@pytest.fixture
def serve(tmp_path: Path, root: Path) -> Iterator[ServeProcess]:
    s = ServeProcess(root / "state", model_roots=[root]).start()  # the state dir inside the root
    yield s
    s.stop()


def test_paths_outside_the_policy_are_400_and_register_nothing(serve: ServeProcess, root: Path,
                                                               tmp_path: Path) -> None:
    fake_model(root / "tokenlink")
    (root / "tokenlink" / "model.safetensors").unlink()
    (root / "tokenlink" / "model.safetensors").symlink_to(serve.api_token_file)
    fake_model(root / "hardlink")
    (root / "hardlink" / "model.safetensors").unlink()
    os.link(serve.api_token_file, root / "hardlink" / "model.safetensors")
    refused = {
        ".": "not an absolute path", "..": "not an absolute path", "good": "not an absolute path",
        "/": "outside every model root", str(serve.state_dir): "never serves",
        str(root): "contains", str(serve.state_dir / ".."): "contains",
        str(tmp_path / "outside"): "outside every model root", str(root / "escape"): "outside every model root",
        str(root / "filelink"): "outside every model root",  # a file link that leads out of the roots
        str(root / "fifo"): "is a FIFO", str(root / "noweights"): "no weight files",
        str(root / "missing"): "does not exist", str(root / "tokenlink"): "never serves",
        str(root / "hardlink"): "is a token or key file",
    }
    api = {"Authorization": f"Bearer {serve.api_token}"}
    with httpx.Client(base_url=serve.url, headers=api, timeout=30) as http:
        for path, why in refused.items():
            for route, body, field in (("/v1/pcm/workloads", submission(path), "context.model"),
                                       ("/v1/pcm/models", {"path": path}, "path")):
                r = http.post(route, json=body)
                assert r.status_code == 400, (path, route, r.text)
                err = r.json()
                assert err["code"] == "model_unavailable" and err["field"] == field, (path, err)
                assert err["detail"].startswith(f"{field}: ") and why in err["detail"], (path, err["detail"])
        for route, body, field in (("/v1/pcm/workloads", submission(""), "context.model"),
                                   ("/v1/pcm/models", {"path": ""}, "path")):  # empty: the schema's own rule
            r = http.post(route, json=body)
            assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert (count(serve, "models"), count(serve, "workloads"), count(serve, "rows")) == (0, 0, 0)
        r = http.post("/v1/pcm/workloads", json=submission(str(root / "good")))
        assert r.status_code == 201, r.text
    assert count(serve, "models") == 1
    assert_no_secret_in_any_manifest(serve)


def assert_no_secret_in_any_manifest(serve: ServeProcess) -> None:
    """Every registered manifest: no file in the state dir, no token among its files or chunks."""
    tokens = [serve.api_token.encode(), serve.pool_token.encode()]
    state = serve.state_dir.resolve()
    pool = {"Authorization": f"Bearer {serve.pool_token}"}
    with sqlite3.connect(serve.state_dir / "pcm.sqlite3") as db:
        models = db.execute("SELECT path, manifest FROM models").fetchall()
    assert models
    for path, text in models:
        m = ModelManifest.model_validate_json(text)
        for f in m.files:
            real = (Path(path) / f.path).resolve()
            assert state not in real.parents and real != state, real
            assert real.read_bytes().strip() not in tokens, real
        for chunk in m.chunk_lengths:
            r = httpx.get(f"{serve.url}/v1/pcm/blobs/{chunk}", headers=pool)
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == chunk
            assert not any(t in r.content for t in tokens)
        for token_hash in (hashlib.sha256(t + b"\n").hexdigest() for t in tokens):
            assert httpx.get(f"{serve.url}/v1/pcm/blobs/{token_hash}", headers=pool).status_code == 404


def test_stored_manifests_that_break_the_rules_are_dropped_at_start(serve: ServeProcess, root: Path) -> None:
    api = {"Authorization": f"Bearer {serve.api_token}"}
    pool = {"Authorization": f"Bearer {serve.pool_token}"}
    (fake_model(root / "later") / "model.safetensors").write_bytes(b"other weights")  # another digest
    digests = {}
    for name in ("good", "later"):
        r = httpx.post(f"{serve.url}/v1/pcm/models", json={"path": str(root / name)}, headers=api)
        assert r.status_code == 201, r.text
        digests[name] = ModelManifest.model_validate(r.json()).digest
    serve.stop()
    (root / "later" / "model.safetensors").unlink()  # now a link to the service's API token
    (root / "later" / "model.safetensors").symlink_to(serve.api_token_file)
    serve.start()
    assert httpx.get(f"{serve.url}/v1/pcm/models/{digests['later']}", headers=pool).status_code == 404
    assert httpx.get(f"{serve.url}/v1/pcm/models/{digests['good']}", headers=pool).status_code == 200
    assert count(serve, "models") == 1
    log = serve.log_path.read_text()
    assert f"dropping the manifest of model {(root / 'later').resolve()}" in log
    assert serve.api_token not in log
    assert_no_secret_in_any_manifest(serve)


def test_serve_without_a_model_root_refuses_every_path(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path / "state", model_roots=[]).start()
    try:
        r = httpx.post(f"{serve.url}/v1/pcm/models", json={"path": str(fake_model(tmp_path / "m"))},
                       headers={"Authorization": f"Bearer {serve.api_token}"})
        assert r.status_code == 400 and "--model-root" in r.json()["detail"]
    finally:
        serve.stop()
