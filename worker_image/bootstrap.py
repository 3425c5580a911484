#!/usr/bin/env python3
"""Bring a glidein's Python environment from PCM itself: standard library only.

Runs with whatever ``python3`` the node has (3.8 or newer). It asks the service which packed
environment workers use, reuses it from the node-local cache when an earlier glidein
unpacked it there, and otherwise fetches the archive's chunks the way workers fetch model
weights: by the service's plans, from peers first (other glideins bootstrapping, and workers
whose caches hold it), each chunk verified by its SHA-256 before it counts or is passed on.
It unpacks into a private directory, fixes the paths that name the packing host's prefix,
marks it complete and renames it into place, so a corrupt or interrupted unpack is never
used. Then it execs the worker from it; the archive stays in the worker's chunk cache, so
the worker serves it to later glideins.

  bootstrap.py --service URL [--token-file F] [--cache DIR] [--work-dir DIR] -- PYTHON-ARGS
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import sys
import tarfile
import threading
import time
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

API = "/v1/pcm"
READY = "pcm-env.ready"  # written last inside the unpacked tree, before the rename
MARKER = ".pcm-manifest.json"  # a complete archive in the chunk cache (the worker's ChunkStore reads it)
PIECE = 256 * 1024
PEER_SCHEME = "PCM-Sig"  # pcm_service.tokens: the peer request signature, here without PCM installed


def log(msg: str) -> None:
    print(f"pcm-bootstrap: {msg}", file=sys.stderr, flush=True)


def peer_key(token: str) -> bytes:
    return hmac.new(token.encode(), b"pcm peer chunk requests v1", hashlib.sha256).digest()


def peer_mac(key: bytes, method: str, path: str, expires: int) -> str:
    return hmac.new(key, f"{method}\n{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def sign(key: bytes, method: str, path: str) -> str:
    expires = int(time.time() + 60)
    return f"{PEER_SCHEME} {expires}:{peer_mac(key, method, path, expires)}"


class Service:
    def __init__(self, url: str, token: Optional[str], ca_file: Optional[str]) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.ssl = ssl.create_default_context(cafile=ca_file) if url.startswith("https") else None

    def connect(self, url: str, timeout: float = 30.0) -> http.client.HTTPConnection:
        u = urlsplit(url)
        if u.scheme == "https":
            return http.client.HTTPSConnection(u.hostname or "", u.port, timeout=timeout, context=self.ssl)
        return http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout)

    def call(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 60.0) -> dict:
        conn = self.connect(self.url, timeout)
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, urlsplit(self.url).path + API + path,
                         json.dumps(body).encode() if body is not None else None, headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise RuntimeError(f"{method} {API}{path}: HTTP {resp.status}: {data[:300].decode(errors='replace')}")
        return json.loads(data) if data else {}


class Archive:
    """The archive's chunks on disk, in the worker's chunk cache layout."""

    def __init__(self, work_dir: str, digest: str, manifest: dict) -> None:
        self.raw = json.dumps(manifest, separators=(",", ":")).encode()
        (f,) = manifest["files"]
        self.size, self.chunk_size = f["size"], manifest["chunk_size"]
        self.dir = os.path.join(work_dir, "models", digest[:16])
        self.path = os.path.join(self.dir, f["path"])
        self.part = os.path.join(self.dir, ".pcm-part-" + f["path"])
        self.where: Dict[str, List[Tuple[int, int]]] = {}
        for i, c in enumerate(f["chunks"]):
            off = i * self.chunk_size
            self.where.setdefault(c, []).append((off, min(self.chunk_size, self.size - off)))
        self.verified: set = set()
        self.lock = threading.Lock()
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(os.path.join(self.dir, MARKER)):
            self.verified = set(self.where)
        else:
            with open(self.part, "ab") as fh:
                fh.truncate(self.size)

    def length(self, chunk: str) -> int:
        return self.where[chunk][0][1]

    def complete(self) -> bool:
        return len(self.verified) == len(self.where)

    def locate(self, chunk: str) -> Optional[Tuple[str, int, int]]:
        with self.lock:
            if chunk not in self.verified:
                return None
            off, n = self.where[chunk][0]
            return (self.path if os.path.exists(os.path.join(self.dir, MARKER)) else self.part), off, n

    def store(self, chunk: str, data: bytes) -> None:
        fd = os.open(self.part, os.O_WRONLY)
        try:
            for off, _ in self.where[chunk]:
                os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        with self.lock:
            self.verified.add(chunk)

    def finish(self) -> None:
        if os.path.exists(os.path.join(self.dir, MARKER)):
            return
        with open(self.part, "rb+") as fh:
            os.fsync(fh.fileno())
        with self.lock:
            os.replace(self.part, self.path)
            with open(os.path.join(self.dir, MARKER), "wb") as fh:
                fh.write(self.raw)


def fetch(svc: Service, archive: Archive, receiver: str, digest: str, blob_url: Optional[str],
          slots: int, parallel: int) -> None:
    """Every chunk, verified, by the service's plans; results reported as each transfer ends."""
    key = peer_key(svc.token) if svc.token else None
    pending: List[dict] = []
    active: set = set()
    lock = threading.Condition()

    def transfer(a: dict) -> None:
        t0, c = time.monotonic(), a["chunk"]
        res = {"chunk": c, "source": a["source"], "ok": False, "bytes": 0, "seconds": 0.0}
        url = a.get("url") or svc.url
        path = urlsplit(url).path.rstrip("/") + f"{API}/blobs/{c}"
        headers = {}
        if a.get("url"):
            if key:
                headers["Authorization"] = sign(key, "GET", path)
        elif svc.token:
            headers["Authorization"] = f"Bearer {svc.token}"
        conn = svc.connect(url)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                res["busy"] = resp.status == 503
                res["error"] = f"HTTP {resp.status}"
            else:
                h, parts = hashlib.sha256(), []
                while True:
                    piece = resp.read(PIECE)
                    if not piece:
                        break
                    h.update(piece)
                    parts.append(piece)
                data = b"".join(parts)
                res["bytes"] = len(data)
                if len(data) != archive.length(c):
                    res["error"] = f"short chunk: {len(data)} of {archive.length(c)} bytes"
                elif h.hexdigest() != c:
                    res["error"], res["corrupt"] = "corrupt chunk: its SHA-256 does not match", True
                else:
                    archive.store(c, data)
                    res["ok"] = True
        except (OSError, http.client.HTTPException) as e:
            res["error"] = f"{e.__class__.__name__}: {e}"
        finally:
            conn.close()
        res["seconds"] = time.monotonic() - t0
        if not res["ok"]:
            log(f"chunk {c[:12]} from {a['source']} failed: {res['error']}")
        with lock:
            pending.append(res)
            active.discard(c)
            lock.notify_all()

    body = {"manifest_digest": digest, "blob_url": blob_url, "upload_slots": slots,
            "glidein_id": os.environ.get("PCM_GLIDEIN_ID") or None}
    last = time.monotonic()
    while not archive.complete():
        with lock:
            results, pending[:] = list(pending), []
            free = parallel - len(active)
        plan = svc.call("POST", f"/bootstrap/{receiver}/fetch",
                        {**body, "results": results, "want": max(free, 0), "wait": 1.0 if free > 0 else 0.0})
        for a in plan["assignments"]:
            with lock:
                active.add(a["chunk"])
            threading.Thread(target=transfer, args=(a,), daemon=True).start()
        p = plan["progress"]
        if time.monotonic() - last > 5:
            log(f"environment {p['bytes_held'] / 2**20:.0f}/{p['bytes_total'] / 2**20:.0f} MiB"
                f" from {p['sources']} sources")
            last = time.monotonic()
        with lock:
            if parallel - len(active) <= 0 and not pending:
                lock.wait(1.0)
    with lock:
        while active:
            lock.wait(1.0)
        results = list(pending)
    if results:
        svc.call("POST", f"/bootstrap/{receiver}/fetch", {**body, "results": results})


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        auth = self.headers.get("Authorization") or ""
        if srv.key is not None:  # type: ignore[attr-defined]
            scheme, _, cred = auth.partition(" ")
            expires, _, mac = cred.partition(":")
            good = scheme == PEER_SCHEME and expires.isdigit() and int(expires) >= time.time() and \
                hmac.compare_digest(mac, peer_mac(srv.key, "GET", self.path, int(expires)))  # type: ignore[attr-defined]
            if not good:
                return self._refuse(403 if auth else 401)
        chunk = self.path.rsplit("/", 1)[-1] if self.path.startswith(f"{API}/blobs/") else ""
        loc = srv.archive.locate(chunk)  # type: ignore[attr-defined]
        if loc is None:
            return self._refuse(404)
        if not srv.slots.acquire(blocking=False):  # type: ignore[attr-defined]
            return self._refuse(503)
        try:
            path, off, n = loc
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            with open(path, "rb") as fh:
                fh.seek(off)
                while n > 0:
                    piece = fh.read(min(PIECE, n))
                    if not piece:
                        break
                    self.wfile.write(piece)
                    n -= len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            srv.slots.release()  # type: ignore[attr-defined]

    def _refuse(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


def serve(archive: Archive, token: Optional[str], service_url: str, slots: int) -> Tuple[str, object]:
    """Pass verified chunks on to other glideins while this one is still fetching."""
    u = urlsplit(service_url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((u.hostname or "127.0.0.1", u.port or 80))
            host = s.getsockname()[0]
        except OSError:
            host = "127.0.0.1"
    httpd = http.server.ThreadingHTTPServer((host, 0), _Handler)
    httpd.daemon_threads = True
    httpd.archive, httpd.key = archive, peer_key(token) if token else None  # type: ignore[attr-defined]
    httpd.slots = threading.BoundedSemaphore(slots)  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://{host}:{httpd.server_address[1]}", httpd


def unpack(archive_path: str, cache: str, digest: str) -> str:
    """Unpack into a private directory, relocate, mark, rename: all or nothing."""
    dest = env_dir(cache, digest)
    os.makedirs(cache, exist_ok=True)
    for name in os.listdir(cache):  # what an unpack killed midway left (its process is gone)
        if name.startswith(f".{digest[:16]}.partial-"):
            pid = name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
    tmp = os.path.join(cache, f".{digest[:16]}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    with tarfile.open(archive_path) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # Python < 3.8.17: the archive's hashes were verified; still refuse escaping names
            for m in tar.getmembers():
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    raise RuntimeError(f"archive member {m.name} would land outside the environment")
            tar.extractall(tmp)
    with open(os.path.join(tmp, "pcm-env.json")) as fh:
        meta = json.load(fh)
    for rel in meta["relocate"]:  # the shebangs and .pth files that name the packing host's paths
        path = os.path.join(tmp, rel)
        with open(path, "rb") as fh:
            data = fh.read()
        for old in meta["old_prefixes"]:
            data = data.replace(old.encode(), dest.encode())
        with open(path, "wb") as fh:
            fh.write(data)
    with open(os.path.join(tmp, READY), "w") as fh:
        fh.write(digest + "\n")
        os.fsync(fh.fileno())
    try:
        os.rename(tmp, dest)
    except OSError:  # another glidein on this node finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not ready(dest, digest):
            raise
    log(f"unpacked {meta['members']} files into {dest} in {time.monotonic() - t0:.1f}s")
    return dest


def env_dir(cache: str, digest: str) -> str:
    """Where an environment is unpacked: named by its digest (a prefix of it: the path goes into
    script shebangs, which the kernel cuts at 256 bytes; the full digest is in its READY file)."""
    return os.path.join(cache, digest[:16])


def ready(dest: str, digest: str) -> bool:
    try:
        with open(os.path.join(dest, READY)) as fh:
            return fh.read().strip() == digest
    except OSError:
        return False


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", required=True)
    p.add_argument("--token-file")
    p.add_argument("--ca-file")
    p.add_argument("--cache", default=os.environ.get("PCM_ENV_CACHE") or None,
                   help="node-local directory for unpacked environments (default: WORK_DIR/env)")
    p.add_argument("--work-dir", default="pcm-worker", help="the worker's work directory (its chunk cache)")
    p.add_argument("--receiver", default=None, help="this glidein's name in the service's transfer plans")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--upload-slots", type=int, default=2, help="chunks served to other glideins at once")
    p.add_argument("python_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.python_args[1:] if a.python_args[:1] == ["--"] else a.python_args
    token_file = a.token_file or os.environ.get("PCM_POOL_TOKEN_FILE")
    token = open(token_file).read().strip() if token_file else os.environ.get("PCM_POOL_TOKEN")
    svc = Service(a.service, token, a.ca_file)
    cache = os.path.abspath(a.cache or os.path.join(a.work_dir, "env"))
    env_info = svc.call("GET", "/environment")
    digest = env_info["digest"]
    dest = env_dir(cache, digest)
    if ready(dest, digest):
        log(f"environment {digest[:12]} already unpacked in {dest}")
    else:
        t0 = time.monotonic()
        archive = Archive(os.path.abspath(a.work_dir), digest, svc.call("GET", f"/models/{digest}"))
        receiver = a.receiver or f"boot-{os.environ.get('PCM_GLIDEIN_ID') or socket.gethostname()}-{os.getpid()}"
        blob_url, httpd = serve(archive, token, a.service, a.upload_slots) if a.upload_slots > 0 else (None, None)
        log(f"fetching environment {digest[:12]} ({archive.size / 2**20:.0f} MiB) as {receiver}")
        try:
            fetch(svc, archive, receiver, digest, blob_url, a.upload_slots, a.parallel)
            archive.finish()
            log(f"fetched in {time.monotonic() - t0:.1f}s")
            dest = unpack(archive.path, cache, digest)
        finally:
            try:
                svc.call("DELETE", f"/bootstrap/{receiver}")
            except (OSError, RuntimeError) as e:
                log(f"could not say goodbye to the service: {e}")
            if httpd is not None:
                httpd.shutdown()  # type: ignore[attr-defined]
    with open(os.path.join(dest, "pcm-env.json")) as fh:
        meta = json.load(fh)
    python = os.path.join(dest, meta["python"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    lib = os.path.join(dest, meta["library_path"])
    env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env["PATH"] = os.path.join(dest, "bin") + ":" + env.get("PATH", "/usr/bin:/bin")
    env["PCM_ENV_DIGEST"] = digest
    sys.stderr.flush()
    os.execve(python, [python, *args], env)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
