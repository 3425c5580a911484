"""Peer-to-peer weight replication on real processes: `pcm serve` as origin, seeders and
agents with their blob servers, real HTTP on 127.0.0.1, real SQLite."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from pcm_service.cli.status_view import context_cell
from pcm_service.client import ServiceClient
from pcm_service.protocol import ORIGIN, ChunkAssignment, ContextState, ModelManifest, ServiceStatus
from pcm_service.tokens import peer_key, sign_peer_request
from pcm_service.weights.chunks import build_manifest, swarm_chunk_size
from tests.support import REPO
from tests.support.serve import ServeProcess, free_port
from worker_image.agent import PeerSettings, WorkerAgent
from worker_image.blobserver import BlobServer

TOKEN = "p2p-test-pool-token"
KIB = 1024


def make_model(d: Path, sizes: dict[str, int], seed: int = 1) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rnd = __import__("random").Random(seed)
    for name, size in sizes.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(rnd.randbytes(size))
    return d


def dir_files(d: Path) -> dict[str, Path]:
    return {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*")) if p.is_file()}


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


class Pool:
    """`pcm serve` with a given pool token (its API token generated) plus helpers to start seeders
    and agents against it."""

    def __init__(self, tmp: Path, chunk_kib: int) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "token").write_text(TOKEN)
        os.chmod(tmp / "token", 0o600)
        self.serve = ServeProcess(tmp / "state", "--pool-token-file", str(tmp / "token"),
                                  "--chunk-size", str(chunk_kib / 1024)).start()
        self.url = self.serve.url
        self.client = self.serve.client()  # the user routes: the API token
        self.user_auth = {"Authorization": f"Bearer {self.serve.api_token}"}
        self.procs: list[subprocess.Popen[str]] = []
        self.agents: list[WorkerAgent] = []

    def register(self, model: Path) -> ModelManifest:
        r = httpx.post(f"{self.url}/v1/pcm/models", json={"path": str(model)}, headers=self.user_auth)
        assert r.status_code == 201, r.text
        return ModelManifest.model_validate(r.json())

    def seeder(self, name: str, digest: str, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        """Start a seeder that fetches ``digest`` and keeps serving it; returns its 'complete' event."""
        p = subprocess.Popen([sys.executable, "-m", "worker_image.seeder", "--service", self.url,
                              "--model", digest, "--work-dir", str(self.tmp / name),
                              "--token-file", str(self.tmp / "token"), "--hold", *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.procs.append(p)
        assert p.stdout is not None
        events = [json.loads(p.stdout.readline()) for _ in range(2)]  # registered, then complete
        assert events[1]["event"] == "complete", events
        return p, {**events[1], "dir": Path(events[1]["dir"])}

    def agent(self, name: str, **peer: Any) -> WorkerAgent:
        """A worker agent in this process (no engine is started: only its fetcher is used)."""
        a = WorkerAgent(ServiceClient(self.url, token=TOKEN), work_dir=self.tmp / name, token=TOKEN,
                        peers=PeerSettings(**peer))
        a.join()
        self.agents.append(a)
        return a

    def transfers(self, worker_id: str) -> list[sqlite3.Row]:
        db = sqlite3.connect(self.serve.state_dir / "pcm.sqlite3")
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM transfers WHERE worker_id=? ORDER BY transfer_id",
                          (worker_id,)).fetchall()

    def status(self) -> ServiceStatus:
        return self.client.request("GET", "/status", None, ServiceStatus)

    def close(self) -> None:
        for a in self.agents:
            a.leave()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.communicate(timeout=30)
        self.serve.stop()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool(tmp_path, chunk_kib=256)
    yield p
    p.close()


def test_manifest_cuts_files_into_hashed_chunks(tmp_path: Path) -> None:
    d = make_model(tmp_path / "m", {"a.bin": 2 * 256 * KIB + 5, "sub/b.bin": 256 * KIB, "c.json": 0})
    (d / "dup.bin").write_bytes((d / "sub" / "b.bin").read_bytes())  # same bytes: same chunk
    m = build_manifest(dir_files(d), 256 * KIB)
    files = {f.path: f for f in m.files}
    assert sorted(files) == ["a.bin", "c.json", "dup.bin", "sub/b.bin"]
    assert len(files["a.bin"].chunks) == 3 and files["c.json"].chunks == []
    raw = (d / "a.bin").read_bytes()
    assert files["a.bin"].chunks[2] == hashlib.sha256(raw[2 * 256 * KIB:]).hexdigest()
    assert files["dup.bin"].chunks == files["sub/b.bin"].chunks
    assert m.chunk_lengths[files["a.bin"].chunks[2]] == 5
    assert len(m.locations[files["dup.bin"].chunks[0]]) == 2
    digest = m.digest
    mib = 2**20
    assert swarm_chunk_size(1024 * mib) == 16 * mib  # >= 64 chunks: a short tail for the swarm
    assert swarm_chunk_size(15 * 1024 * mib) == 64 * mib and swarm_chunk_size(10 * mib) == mib
    assert swarm_chunk_size(10 * mib, 256 * KIB) == 256 * KIB
    (d / "c.json").write_text("{}")
    assert build_manifest(dir_files(d), 256 * KIB).digest != digest


def test_blob_server_takes_only_requests_signed_with_the_pool_key(tmp_path: Path) -> None:
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    chunk = hashlib.sha256(data).hexdigest()
    srv = BlobServer(lambda c: (tmp_path / "f", 0, len(data)) if c == chunk else None, TOKEN).start()
    key, path = peer_key(TOKEN), f"/v1/pcm/blobs/{chunk}"
    try:
        url = f"{srv.url}{path}"

        def get(auth: str | None, **headers: str) -> httpx.Response:
            return httpx.get(url, headers={**({"Authorization": auth} if auth else {}), **headers})

        assert get(None).status_code == 401
        r = get(f"Bearer {TOKEN}")  # the token itself is never what a peer takes
        assert r.status_code == 401 and r.json()["code"] == "missing_token"
        assert get(sign_peer_request(peer_key("another pool"), "GET", path)).status_code == 403
        assert get(sign_peer_request(key, "GET", f"/v1/pcm/blobs/{'0' * 64}")).status_code == 403  # other chunk
        expired = get(sign_peer_request(key, "GET", path, now=time.time() - 3600))
        assert expired.status_code == 403 and "expired" in expired.json()["detail"]
        assert get(f"PCM-Sig 12:{'0' * 64}").status_code == 403
        r = get(sign_peer_request(key, "GET", path))
        assert r.status_code == 200 and r.content == data
        r = get(sign_peer_request(key, "GET", path), Range="bytes=100-199")
        assert r.status_code == 206 and r.content == data[100:200]
        assert get(sign_peer_request(key, "GET", path), Range="bytes=5000-").status_code == 416
        other = f"/v1/pcm/blobs/{'0' * 64}"
        r = httpx.get(f"{srv.url}{other}", headers={"Authorization": sign_peer_request(key, "GET", other)})
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    finally:
        srv.stop()


def test_origin_and_plans_need_the_pool_token(pool: Pool, tmp_path: Path) -> None:
    m = pool.register(make_model(tmp_path / "model", {"w.bin": 300 * KIB, "config.json": 10}))
    chunk = m.files[0].chunks[0]
    assert httpx.get(f"{pool.url}/v1/pcm/blobs/{chunk}").status_code == 401
    assert httpx.get(f"{pool.url}/v1/pcm/models/{m.digest}",
                     headers={"Authorization": "Bearer wrong"}).status_code == 403
    r = httpx.get(f"{pool.url}/v1/pcm/blobs/{chunk}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == chunk
    assert httpx.post(f"{pool.url}/v1/pcm/models", json={"path": str(tmp_path / "missing")},
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403  # a worker's token
    r = httpx.post(f"{pool.url}/v1/pcm/models", json={"path": str(tmp_path / "missing")}, headers=pool.user_auth)
    assert r.status_code == 400 and r.json()["detail"].startswith("path: model directory")


def test_newcomer_fetches_from_several_peers_at_once(pool: Pool, tmp_path: Path) -> None:
    origin = make_model(tmp_path / "model", {"a.bin": 1024 * KIB, "b.bin": 700 * KIB, "config.json": 50})
    m = pool.register(origin)
    pool.seeder("a", m.digest)
    pool.seeder("b", m.digest)
    _, c = pool.seeder("c", m.digest)
    assert same_files(origin, c["dir"])
    got = pool.transfers(c["worker_id"])
    assert all(t["ok"] for t in got) and len(got) == len(m.chunk_lengths)
    peers = {t["source"] for t in got} - {ORIGIN}
    assert len(peers) == 2, [dict(t) for t in got]  # both holders served it
    st = pool.status().transfers
    assert st.origin_bytes <= 2 * m.total_bytes and st.peer_bytes >= m.total_bytes


def test_corrupt_chunk_in_a_peer_cache_is_refetched_elsewhere_and_never_used(pool: Pool,
                                                                             tmp_path: Path) -> None:
    origin = make_model(tmp_path / "model", {"a.bin": 1024 * KIB, "config.json": 100})
    m = pool.register(origin)
    _, a = pool.seeder("a", m.digest)
    bad = m.files[[f.path for f in m.files].index("a.bin")].chunks[1]
    with (a["dir"] / "a.bin").open("r+b") as fh:  # bit rot in the peer's cache, after verification
        fh.seek(256 * KIB + 10)
        fh.write(b"\xff" * 16)
    # one download at a time: every chunk is offered from the peer while it has a free slot
    _, b = pool.seeder("b", m.digest, "--parallel", "1")
    assert same_files(origin, b["dir"])
    got = pool.transfers(b["worker_id"])
    failed = [t for t in got if not t["ok"]]
    assert [(t["source"], t["chunk"]) for t in failed] == [(a["worker_id"], bad)], [dict(t) for t in got]
    assert "mismatch" in failed[0]["error"]
    again = [t for t in got if t["ok"] and t["chunk"] == bad]
    assert len(again) == 1 and again[0]["source"] != a["worker_id"]
    db = sqlite3.connect(pool.serve.state_dir / "pcm.sqlite3")
    holders = {r[0] for r in db.execute("SELECT worker_id FROM replicas WHERE chunk=?", (bad,))}
    # one worker's word does not take a's replica away (it may lie about its source): a second must say so
    assert a["worker_id"] in holders and b["worker_id"] in holders


def test_peer_dying_mid_transfer_does_not_stop_the_newcomer(pool: Pool, tmp_path: Path) -> None:
    origin = make_model(tmp_path / "model", {"w.bin": 3 * 1024 * KIB, "config.json": 100})
    pool_big = Pool(tmp_path, chunk_kib=2048)  # 1 MiB chunks at 1 MB/s: a transfer lasts ~1 s
    try:
        m = pool_big.register(origin)
        seeder, a = pool_big.seeder("a", m.digest, "--upload-rate", str(1e6))  # 1 MB/s
        b = pool_big.agent("b", serve=False, fetch_parallel=1)
        from_a = threading.Event()

        def on_bytes(asg: ChunkAssignment, received: int) -> None:
            if asg.source == a["worker_id"] and received < asg.length:  # mid-chunk
                from_a.set()

        b.fetcher.on_bytes = on_bytes
        b.context_state = ContextState.FETCHING
        b._send_heartbeat()
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(dir=b.fetcher.fetch(m.digest)))
        t.start()
        assert from_a.wait(60), "the newcomer never got bytes from the peer"
        me = next(w for w in pool_big.status().workers if w.worker_id == b.worker_id)
        assert me.context_state == ContextState.FETCHING and me.fetch is not None
        assert me.fetch.chunks_total == len(m.chunk_lengths) and me.fetch.sources == 1
        assert context_cell(me).startswith(f"fetching {me.fetch.chunks_held}/{len(m.chunk_lengths)} chunks")
        assert context_cell(me).endswith("from 1 source")
        seeder.send_signal(signal.SIGKILL)
        t.join(120)
        assert "dir" in result, "the newcomer did not finish after its peer died"
        assert same_files(origin, result["dir"])
        got = pool_big.transfers(b.worker_id)
        assert any(not x["ok"] and x["source"] == a["worker_id"] for x in got), [dict(x) for x in got]
        assert {x["chunk"] for x in got if x["ok"]} == set(m.chunk_lengths)
    finally:
        pool_big.close()


class RecordingProxy:
    """A TCP relay on 127.0.0.1 that keeps every byte it relays, both ways: what a peer transfer
    puts on the wire."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.sent = bytearray()  # newcomer → peer
        self.received = bytearray()  # peer → newcomer
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            for src, dst, buf in ((client, upstream, self.sent), (upstream, client, self.received)):
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    buf.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_peer_transfer_on_the_wire_holds_no_token(pool: Pool, tmp_path: Path) -> None:
    origin = make_model(tmp_path / "model", {"w.bin": 1024 * KIB, "config.json": 100})
    m = pool.register(origin)
    port = free_port()
    proxy = RecordingProxy(port)  # peers reach seeder "a" only through the proxy
    try:
        _, a = pool.seeder("a", m.digest, "--blob-port", str(port), "--blob-url", f"http://127.0.0.1:{proxy.port}")
        _, b = pool.seeder("b", m.digest, "--parallel", "1")
        assert same_files(origin, b["dir"])
        got = pool.transfers(b["worker_id"])
        from_a = [t for t in got if t["ok"] and t["source"] == a["worker_id"]]
        assert from_a and sum(t["bytes"] for t in from_a) <= len(proxy.received)  # it all went through
        wire = bytes(proxy.sent + proxy.received)
        assert b"Authorization: PCM-Sig " in proxy.sent
        for secret in (TOKEN, pool.serve.api_token):
            assert secret.encode() not in wire
            assert base64.b64encode(secret.encode()) not in wire
    finally:
        proxy.close()
