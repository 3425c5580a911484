"""Fetch a model's chunks from several sources at once, as the service's plan says.

The main loop asks the service for sources (long-polling while none is free);
one thread per transfer streams a chunk into the cache, hashing as it goes, and
reports the result itself so the service can hand the freed slot to the next
newcomer at once. A chunk that is corrupt, short or late is simply asked for
again; the service picks another source and avoids the failing one.
"""
from __future__ import annotations

import http.client
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from pcm_service.client import ServiceClient, ServiceError
from pcm_service.protocol import (
    API_PREFIX,
    ChunkAssignment,
    FetchPlan,
    FetchRequest,
    ModelManifest,
    TransferResult,
)
from pcm_service.tokens import peer_key, sign_peer_request
from worker_image.chunkstore import ChunkFault, ChunkStore

log = logging.getLogger("pcm.fetch")
PlanCall = Callable[[FetchRequest], FetchPlan]
# readinto() blocks until its buffer is full: a buffer smaller than a chunk lets progress
# (and a dead source) show within a chunk, at no extra copy
RECV_BUFFER = 256 * 1024


class FetchFailed(RuntimeError):
    pass


class ModelFetcher:
    def __init__(self, client: ServiceClient, plan: PlanCall, store: ChunkStore,
                 token: Optional[str] = None, parallel: int = 4, timeout: float = 30.0,
                 stall_timeout: float = 600.0,
                 on_bytes: Optional[Callable[[ChunkAssignment, int], None]] = None) -> None:
        self.client = client
        self.plan = plan
        self.store = store
        # the service (origin) takes the pool token, over TLS when it has a certificate; peers
        # take a short-lived signature made with a key derived from it, never the token
        self.origin_headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.peer_key = peer_key(token) if token else None
        self.parallel = parallel
        self.timeout = timeout  # no byte from a source for this long: try another one
        self.stall_timeout = stall_timeout
        self.on_bytes = on_bytes
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._unreported: list[TransferResult] = []
        self._done = threading.Event()

    def manifest(self, digest: str) -> ModelManifest:
        return self.client.request("GET", f"/models/{digest}", None, ModelManifest)

    def fetch(self, digest: str, stopping: Optional[threading.Event] = None) -> Path:
        """Return the local model directory once every chunk is verified."""
        m = self.manifest(digest)
        model_dir = self.store.prepare(m)
        threads: list[threading.Thread] = []
        last_held, last_change = -1, time.monotonic()
        while not self.store.complete(m):
            if stopping is not None and stopping.is_set():
                raise FetchFailed("stopped while fetching the model")
            with self._lock:
                free = self.parallel - len(self._active)
                results, self._unreported = self._unreported, []
            if free <= 0 and not results:
                self._done.wait(1.0)
                self._done.clear()
                continue
            plan = self.plan(FetchRequest(manifest_digest=digest, results=results, want=max(free, 0),
                                          wait=1.0))
            held = len(self.store.held())
            if held != last_held:
                last_held, last_change = held, time.monotonic()
            elif time.monotonic() - last_change > self.stall_timeout:
                raise FetchFailed(f"no chunk arrived for {self.stall_timeout:.0f}s;"
                                  f" {plan.progress.chunks_held}/{plan.progress.chunks_total} held")
            for a in plan.assignments:
                with self._lock:
                    if self.store.has(a.chunk):  # arrived while the service did not know yet
                        self._unreported.append(TransferResult(chunk=a.chunk, source=a.source, ok=True))
                        continue
                    self._active.add(a.chunk)
                t = threading.Thread(target=self._transfer, args=(m, a), daemon=True,
                                     name=f"pcm-fetch-{a.chunk[:8]}")
                t.start()
                threads.append(t)
            threads = [t for t in threads if t.is_alive()]
        for t in threads:
            t.join(self.timeout)  # their results reach the service before we report done
        with self._lock:
            results, self._unreported = self._unreported, []
        if results:
            self.plan(FetchRequest(manifest_digest=digest, results=results))
        return model_dir

    def _transfer(self, m: ModelManifest, a: ChunkAssignment) -> None:
        t0 = time.monotonic()
        res = TransferResult(chunk=a.chunk, source=a.source, ok=False)
        writer = self.store.writer(m, a.chunk)
        u = urlsplit(a.url or self.client.url)
        path = f"{u.path.rstrip('/')}{API_PREFIX}/blobs/{a.chunk}"
        conn: http.client.HTTPConnection
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname or "127.0.0.1", u.port, timeout=self.timeout,
                                               context=self.client.ssl_context)
        else:
            conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=self.timeout)
        if a.url is None:
            headers = self.origin_headers
        else:
            headers = {"Authorization": sign_peer_request(self.peer_key, "GET", path)} if self.peer_key else {}
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                res.busy = resp.status == 503
                res.error = f"HTTP {resp.status}: {resp.read(300).decode(errors='replace')}"
            else:
                buf = memoryview(bytearray(RECV_BUFFER))
                while True:
                    n = resp.readinto(buf)
                    if not n:
                        break
                    writer.write(buf[:n])
                    if self.on_bytes is not None:
                        self.on_bytes(a, writer.received)
                problem = writer.commit()
                res.ok = problem is None
                if problem is not None:
                    res.error, res.corrupt = problem.message, problem.kind == ChunkFault.CORRUPT
        except (OSError, http.client.HTTPException, ValueError) as e:
            res.error = f"{e.__class__.__name__}: {e}"
        finally:
            writer.close()
            conn.close()
        res.bytes, res.seconds = writer.received, time.monotonic() - t0
        if not res.ok:
            log.warning("chunk %s… from %s failed: %s", a.chunk[:12], a.source, res.error)
        try:  # the service frees the source's slot before we count ours free again
            self.plan(FetchRequest(manifest_digest=m.digest, results=[res]))
            unreported = []
        except ServiceError:
            unreported = [res]
        with self._lock:
            self._unreported.extend(unreported)
            self._active.discard(a.chunk)
        self._done.set()
