"""Content-addressed model chunks: manifests, byte ranges and upload rate limits.

Shared by the service (the origin copy) and the workers (their caches and blob
servers), so both cut, name and serve chunks the same way.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping

from pcm_service.protocol import ModelFile, ModelManifest

DEFAULT_CHUNK_SIZE = 64 * 2**20
PIECE = 2**20  # read, hash, send and rate-limit in pieces of this size
CHUNK_RE = re.compile(r"[0-9a-f]{64}")
ModelFiles = Mapping[str, Path]  # relative name → the file to read (ModelPolicy.check makes it)


def stat_signature(files: ModelFiles) -> str:
    """Cheap identity (names, sizes, mtimes): tells when a manifest must be rebuilt."""
    h = hashlib.sha256()
    for rel, f in sorted(files.items()):
        st = f.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def swarm_chunk_size(total_bytes: int, max_size: int = DEFAULT_CHUNK_SIZE, min_chunks: int = 64) -> int:
    """Chunks small enough that a model has ``min_chunks`` of them (a power of two, at most
    ``max_size``, at least 1 MiB): a newcomer can pass a chunk on as soon as it has verified
    it, so smaller chunks shorten the time the last chunks take to reach everyone."""
    size = 2**20
    while size * 2 <= max_size and total_bytes / (size * 2) >= min_chunks:
        size *= 2
    return min(size, max_size)


def build_manifest(files: ModelFiles, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ModelManifest:
    """Hash every file in ``chunk_size`` pieces (the last one of a file is shorter)."""
    out = []
    for rel, f in sorted(files.items()):
        chunks = []
        with f.open("rb") as fh:
            while True:
                h = hashlib.sha256()
                n = 0
                while n < chunk_size:
                    piece = fh.read(min(PIECE, chunk_size - n))
                    if not piece:
                        break
                    h.update(piece)
                    n += len(piece)
                if n == 0:
                    break
                chunks.append(h.hexdigest())
        out.append(ModelFile(path=rel, size=f.stat().st_size, chunks=chunks))
    return ModelManifest(chunk_size=chunk_size, files=out)


class RateLimiter:
    """Bytes per second shared by all transfers of one uploader (``rate`` 0: unlimited)."""

    def __init__(self, rate: float = 0.0) -> None:
        self.rate = rate
        # send in pieces of ~1/10 s at low rates so a transfer's pace is even
        self.piece = PIECE if rate <= 0 else int(min(PIECE, max(64 * 1024, rate / 10)))
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


class Slots:
    """A bound on concurrent uploads; ``try_acquire`` never blocks (busy → HTTP 503)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._sem = threading.BoundedSemaphore(n) if n > 0 else None

    def try_acquire(self) -> bool:
        return self._sem.acquire(blocking=False) if self._sem else True

    def release(self) -> None:
        if self._sem:
            self._sem.release()


def read_pieces(path: Path, offset: int, length: int, limiter: RateLimiter) -> Iterator[bytes]:
    """A chunk's bytes from a file, paced by ``limiter`` (the origin's HTTP response body)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # registered as a real file: a link now is a swap
    try:
        done = 0
        while done < length:
            n = min(limiter.piece, length - done)
            limiter.take(n)
            data = os.pread(fd, n, offset + done)
            if not data:
                raise OSError(f"{path} is shorter than its manifest says")
            done += len(data)
            yield data
    finally:
        os.close(fd)
