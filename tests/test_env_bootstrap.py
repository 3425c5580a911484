"""The worker environment as part of the context: `pcm env pack`, shipped by a real `pcm serve`
in chunks, fetched and unpacked by worker_image/bootstrap.py under the system's python3 with
an empty environment (no venv, no PYTHONPATH), from peers first, verified, all or nothing."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

import pytest

from pcm_service.client import ServiceError
from pcm_service.protocol import ORIGIN, ModelManifest, WorkerRegistration
from pcm_service.tokens import peer_key, sign_peer_request
from tests.support.serve import ServeProcess
from tests.support.state import db
from tests.support.waiting import wait_for
from worker_image import bootstrap
from worker_image.blobserver import BlobServer
from worker_image.chunkstore import ChunkStore

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = REPO / "worker_image" / "bootstrap.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # not the interpreter the venv was made from
# the engine's packages are not needed to check the environment itself: a small archive
LIGHT = ("torch*", "triton*", "vllm*", "llvmlite*", "numba*", "cv2", "opencv*", "transformers*", "sympy*",
         "mypy*", "matplotlib*", "fontTools*", "scipy*", "anthropic*", "mistral_common*", "pycountry*",
         "grpc*", "openai*", "hypothesis*", "schemathesis*", "jsonschema_rs*", "pillow*", "PIL", "numpy*",
         "tokenizers*", "sentencepiece*", "xgrammar*", "cryptography*", "outlines*", "tiktoken*", "*mypyc*",
         "networkx*", "pandas*", "pyarrow*", "gguf*", "accelerate*", "llguidance*", "ray*", "htcondor*",
         "kiwisolver*", "contourpy*", "pydantic_core-*.dist-info")
CHECK = ("import json, os, sqlite3, ssl, sys, pcm_service.cli, pydantic;"
         " print(json.dumps({'prefix': sys.prefix, 'exe': sys.executable, 'pcm': pcm_service.__file__,"
         " 'digest': os.environ['PCM_ENV_DIGEST'], 'ld': os.environ['LD_LIBRARY_PATH'], 'path': sys.path}))")

pytestmark = pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason=f"no {SYSTEM_PYTHON} on this machine")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("envpack") / "pcm-env.tar.gz"
    args = [a for p in LIGHT for a in ("--exclude", p)]
    subprocess.run([sys.executable, "-m", "pcm_service.cli", "env", "pack", "-o", str(out), *args],
                   check=True, timeout=600)
    return out


@pytest.fixture
def service(tmp_path: Path, archive: Path) -> Iterator[ServeProcess]:
    # the peers these tests register by hand never heartbeat: on a loaded machine a bootstrap
    # outlasted the default 10 s, the peer was declared lost and its replicas went with it
    s = ServeProcess(tmp_path / "state", "--worker-env", str(archive), "--chunk-size", "4",
                     "--worker-timeout", "3600").start()
    yield s
    s.stop()


def run_bootstrap(service: ServeProcess, node: Path, *python_args: str, **kw: Any) -> subprocess.Popen[str]:
    """The bootstrap as a glidein runs it: the node's python3, nothing of PCM's in the environment."""
    node.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [SYSTEM_PYTHON, str(BOOTSTRAP), "--service", service.url, "--token-file", str(service.pool_token_file),
         "--work-dir", str(node / "pcm-worker"), *kw.pop("extra", ()), "--", *python_args],
        cwd=node, env={"PATH": "/usr/bin:/bin", "HOME": str(node)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kw)


def finished(p: subprocess.Popen[str]) -> str:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return out


def transfers(service: ServeProcess) -> list[sqlite3.Row]:
    with db(service.state_dir) as conn:
        return conn.execute("SELECT worker_id, source, chunk, ok, error FROM transfers ORDER BY transfer_id").fetchall()


def env_digest(service: ServeProcess) -> str:
    with closing(service.worker_client()) as c:
        return str(c.request("GET", "/environment")["digest"])


def test_a_node_without_pcm_runs_the_worker_from_the_packed_environment(service: ServeProcess,
                                                                        tmp_path: Path) -> None:
    out = finished(run_bootstrap(service, tmp_path / "node1", "-c", CHECK))
    info = json.loads(out.strip().splitlines()[-1])
    digest = env_digest(service)
    env = tmp_path / "node1" / "pcm-worker" / "env" / digest[:16]
    assert info["digest"] == digest
    assert Path(info["prefix"]) == env and Path(info["exe"]).parent == env / "bin"
    assert Path(info["pcm"]).is_relative_to(env)  # PCM itself was copied in, not the editable install
    assert not any(p.startswith(str(REPO)) for p in info["path"]), info["path"]
    assert info["ld"].split(":")[0] == str(env / "lib")
    assert (env / "lib" / "libsqlite3.so.0").exists()  # the system libraries its modules load came along
    # script shebangs were rewritten to the unpacked prefix: the `pcm` script runs
    pcm = env / "bin" / "pcm"
    assert pcm.read_text().splitlines()[0] in (f"#!{env}/bin/python", f"#!{env}/bin/python3.11")
    help_ = subprocess.run([str(pcm), "env", "--help"], capture_output=True, text=True, timeout=120,
                           env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(env / "lib")})
    assert help_.returncode == 0 and "pack" in help_.stdout, help_.stderr
    # every chunk came from the origin (nobody else had it) and the archive stays in the worker's
    # chunk cache, which the worker's ChunkStore adopts and offers to peers
    rows = transfers(service)
    assert rows and all(r["ok"] and r["source"] == ORIGIN for r in rows)
    store = ChunkStore(tmp_path / "node1" / "pcm-worker" / "models")
    with closing(service.worker_client()) as c:
        manifest = c.request("GET", f"/models/{digest}", None, ModelManifest)
    assert store.complete(manifest) and set(store.held()) == set(manifest.chunk_lengths)
    # a second glidein on this node with the same cache reuses the unpacked tree: no transfer at all
    out2 = finished(run_bootstrap(service, tmp_path / "node1b", "-c", CHECK,
                                  extra=("--cache", str(tmp_path / "node1" / "pcm-worker" / "env"))))
    assert json.loads(out2.strip().splitlines()[-1])["prefix"] == str(env)
    assert len(transfers(service)) == len(rows)


def test_the_next_glidein_gets_the_environment_from_a_peer_and_refetches_a_corrupt_chunk(
        service: ServeProcess, tmp_path: Path) -> None:
    digest = env_digest(service)
    finished(run_bootstrap(service, tmp_path / "node1", "-c", "pass"))
    first = len(transfers(service))
    # node1's worker holds the archive in its chunk cache and serves it (the real blob server)
    store = ChunkStore(tmp_path / "node1" / "pcm-worker" / "models")
    blobs = BlobServer(store.locate, service.pool_token, upload_slots=8).start()
    with closing(service.worker_client()) as c:
        manifest = c.request("GET", f"/models/{digest}", None, ModelManifest)
        peer = c.request("POST", "/workers", WorkerRegistration(
            host="node1", pid=1, blob_url=blobs.url, upload_slots=8, chunks=store.held(),
            environment=digest))["worker_id"]
    # one chunk of the peer's copy goes bad on its disk
    where = store.locate(list(manifest.chunk_lengths)[3])
    assert where is not None
    bad_file, bad_off, _ = where
    with open(bad_file, "r+b") as fh:
        fh.seek(bad_off + 10)
        byte = fh.read(1)
        fh.seek(bad_off + 10)
        fh.write(bytes([byte[0] ^ 0xFF]))
    bad = list(manifest.chunk_lengths)[3]
    try:
        finished(run_bootstrap(service, tmp_path / "node2", "-c", CHECK, extra=("--upload-slots", "0")))
    finally:
        blobs.stop()
    rows = transfers(service)[first:]
    from_peer = [r for r in rows if r["source"] == peer and r["ok"]]
    assert from_peer, "the newcomer should fetch from the peer that holds the environment"
    # the bad chunk is asked from the peer first (it holds it, with free slots): detected, refetched
    bad_rows = [r for r in rows if r["chunk"] == bad]
    assert bad_rows[0]["source"] == peer and not bad_rows[0]["ok"] and "corrupt" in bad_rows[0]["error"]
    assert bad_rows[-1]["ok"] and bad_rows[-1]["source"] == ORIGIN
    # one newcomer's word does not take the peer's replica away (it may lie about its source);
    # a second reporter's does (tests/test_replicas.py)
    with db(service.state_dir) as conn:
        assert conn.execute("SELECT 1 FROM replicas WHERE chunk=? AND worker_id=?", (bad, peer)).fetchone()
    # what node2 verified is exact: its archive equals the origin's byte for byte
    node2 = ChunkStore(tmp_path / "node2" / "pcm-worker" / "models")
    assert node2.complete(manifest)
    assert (node2.model_dir(manifest) / "pcm-env.tar.gz").read_bytes() == service_archive(service).read_bytes()


def service_archive(service: ServeProcess) -> Path:
    return Path(service.args[service.args.index("--worker-env") + 1])


def test_an_unpack_killed_midway_is_never_used(service: ServeProcess, tmp_path: Path) -> None:
    node = tmp_path / "node"
    cache = node / "pcm-worker" / "env"
    digest = env_digest(service)
    p = run_bootstrap(service, node, "-c", "pass")
    partial = wait_for(lambda: next(iter(cache.glob(f".{digest[:16]}.partial-*/lib")), None), 300,
                       "the unpack to start", every=0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert partial.exists() and not (cache / digest[:16]).exists()
    out = finished(run_bootstrap(service, node, "-c", "import sys; print(sys.prefix)"))
    assert out.strip() == str(cache / digest[:16])
    assert (cache / digest[:16] / bootstrap.READY).read_text().strip() == digest
    assert not list(cache.glob(".*partial-*")), "the killed unpack's leftovers are removed"


def test_bootstrap_signs_peer_requests_as_pcm_does() -> None:
    key = peer_key("a-pool-token")
    assert bootstrap.peer_key("a-pool-token") == key
    ours = sign_peer_request(key, "GET", "/v1/pcm/blobs/ab", now=1000.0)
    expires = int(ours.split()[1].split(":")[0])
    assert ours.split(":")[1] == bootstrap.peer_mac(key, "GET", "/v1/pcm/blobs/ab", expires)


def test_bad_worker_env_and_unknown_environment(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pcm_service.cli", "serve", "--state-dir", str(tmp_path / "s"),
                        "--worker-env", str(tmp_path / "missing.tar.gz")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--worker-env" in p.stderr and "pcm env pack" in p.stderr
    s = ServeProcess(tmp_path / "state").start()
    try:
        with pytest.raises(ServiceError) as e, closing(s.worker_client()) as c:
            c.request("GET", "/environment")
        assert e.value.status == 404 and "--worker-env" in str(e.value)
    finally:
        s.stop()


def test_pcm_status_shows_a_glidein_fetching_the_environment(tmp_path: Path, archive: Path) -> None:
    slow = ServeProcess(tmp_path / "state", "--worker-env", str(archive), "--chunk-size", "4",
                        "--origin-rate", "5").start()
    p = run_bootstrap(slow, tmp_path / "node", "-c", "pass")
    try:
        def fetching() -> tuple[int, int] | None:
            out = subprocess.run([sys.executable, "-m", "pcm_service.cli", "status", "--service", slow.url,
                                  "--token-file", str(slow.api_token_file)], capture_output=True, text=True,
                                 timeout=60, env={**os.environ, "COLUMNS": "80"}).stdout
            line = next((x for x in out.splitlines() if x.startswith("Environment: 1 glidein fetching")), None)
            if line is None:
                return None
            held, total = line.rsplit(", ", 1)[1].removesuffix(" MiB").split("/")
            return (int(held), int(total)) if int(held) > 0 else None

        held, total = wait_for(fetching, 120, "pcm status to show the glidein fetching the environment")
        assert held < total == round(archive.stat().st_size / 2**20)
    finally:
        p.kill()
        p.wait(30)
        slow.stop()
