"""Content-addressed model chunks: manifests, byte ranges and upload rate limits.

Shared by the service (the origin copy) and the workers (their caches and blob
servers), so both cut, name and serve chunks the same way.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import threading
import time
from pathlib import Path, PosixPath
from typing import Iterator, Mapping, NamedTuple, Optional

from pcm_service.protocol import ModelFile, ModelManifest

DEFAULT_CHUNK_SIZE = 64 * 2**20
PIECE = 2**20  # read, hash, send and rate-limit in pieces of this size
CHUNK_RE = re.compile(r"[0-9a-f]{64}")
ModelFiles = Mapping[str, Path]  # relative name → the file to read (ModelPolicy.check makes it)
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in must not hang the open; fstat refuses it right after
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class FileId(NamedTuple):
    """Which file a name led to when the model policy checked it (inode reuse also changes size or mtime)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileId":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class RegisteredFile(PosixPath):
    """A model file's real path with the identity checked at registration, so that a later
    read opens that very file or nothing (``ModelPolicy.check`` makes them)."""

    pin: Optional[FileId] = None

    @classmethod
    def pinned(cls, path: Path, st: os.stat_result) -> "RegisteredFile":
        f = cls(path)
        f.pin = FileId.of(st)
        return f


class FileChanged(OSError):
    """A registered file is no longer the file that was checked: a swap, never followed."""


def open_registered(path: Path) -> int:
    """A descriptor on ``path`` opened one component at a time without following any link
    (a directory swapped for a symlink is refused, not followed), and, for a RegisteredFile,
    only if it is still the inode checked at registration (a swapped-in hard link is refused)."""
    parts = path.parts
    if not parts or parts[-1] in (path.anchor, ".", ".."):
        raise FileChanged(f"{path} names no file")
    start = path.anchor or "."
    fd = os.open(start, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for name in parts[1 if path.anchor else 0:-1]:
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:  # ELOOP/ENOTDIR: a symbolic link or a file where a directory was
                raise FileChanged(f"{path}: {name} is no longer a real directory ({e.strerror})") from None
            os.close(fd)
            fd = sub
        try:
            out = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as e:
            raise FileChanged(f"{path} is no longer a real file ({e.strerror})") from None
    finally:
        os.close(fd)
    st = os.fstat(out)
    pin = getattr(path, "pin", None)
    if not stat.S_ISREG(st.st_mode) or (pin is not None and FileId.of(st) != pin):
        os.close(out)
        raise FileChanged(f"{path} is no longer the file registered: the service does not read it")
    return out


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
        with open(open_registered(f), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
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
        out.append(ModelFile(path=rel, size=size, chunks=chunks))
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
    """A chunk's bytes from a file, paced by ``limiter`` (the origin's HTTP response body).
    The file is opened here, before any byte is sent: FileChanged if it is not the one registered."""
    fh = open(open_registered(path), "rb", buffering=0)  # closed by the body, or when dropped unread
    return _pieces(fh, path, offset, length, limiter)


def _pieces(fh: io.FileIO, path: Path, offset: int, length: int, limiter: RateLimiter) -> Iterator[bytes]:
    with fh:
        done = 0
        while done < length:
            n = min(limiter.piece, length - done)
            limiter.take(n)
            data = os.pread(fh.fileno(), n, offset + done)
            if not data:
                raise OSError(f"{path} is shorter than its manifest says")
            done += len(data)
            yield data
