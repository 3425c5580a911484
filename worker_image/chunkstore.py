"""A worker's model cache, written chunk by chunk in place.

Each arriving chunk is written straight into its model file (no second copy)
and hashed on the way; it counts, and is offered to peers, only once its hash
matches. A file keeps a hidden ``.pcm-part-`` name until all of its chunks are
verified, so neither the engine nor a peer ever sees unverified bytes.
"""
from __future__ import annotations

import enum
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pcm_service.protocol import ModelManifest

MARKER = ".pcm-manifest.json"  # written when every chunk of a model is verified


def _part(path: Path) -> Path:
    return path.with_name(".pcm-part-" + path.name)


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._verified: dict[str, tuple[Path, int, int]] = {}  # chunk → (final path, offset, length)
        self._final: set[Path] = set()  # files renamed to their real name
        self._models: dict[str, ModelManifest] = {}
        self._missing: dict[str, set[str]] = {}  # manifest → chunks not verified yet
        for marker in self.root.glob(f"*/{MARKER}"):  # complete models from an earlier run
            m = ModelManifest.model_validate_json(marker.read_text())
            self._adopt(m, complete=True)

    def model_dir(self, m: ModelManifest) -> Path:
        return self.root / m.digest[:16]

    def _adopt(self, m: ModelManifest, complete: bool) -> None:
        d = self.model_dir(m)
        self._models[m.digest] = m
        locs = m.locations
        self._missing[m.digest] = set() if complete else set(locs)
        if complete:
            for f in m.files:
                self._final.add(d / f.path)
            for c, where in locs.items():
                self._verified.setdefault(c, (d / where[0][0], where[0][1], where[0][2]))

    def prepare(self, m: ModelManifest) -> Path:
        """Create the model's files (sparse, hidden names) so chunks can land in any order."""
        d = self.model_dir(m)
        with self._lock:
            if m.digest in self._models:
                return d
            for f in m.files:
                final = d / f.path
                final.parent.mkdir(parents=True, exist_ok=True)
                if not f.chunks:  # empty file: nothing to verify
                    final.touch()
                    self._final.add(final)
                    continue
                with _part(final).open("wb") as fh:
                    fh.truncate(f.size)
            self._adopt(m, complete=False)
        for c in list(self._missing[m.digest]):
            if c in self._verified:  # the same chunk is in a model we already hold
                self._copy_to_locations(m, c, self._path_of(c))
                self._mark_verified(m, c)
        self._finish_model(m)
        return d

    def complete(self, m: ModelManifest) -> bool:
        return m.digest in self._models and not self._missing[m.digest]

    def held(self) -> list[str]:
        with self._lock:
            return list(self._verified)

    def has(self, chunk: str) -> bool:
        return chunk in self._verified

    def _path_of(self, chunk: str) -> tuple[Path, int, int]:
        final, off, length = self._verified[chunk]
        return (final if final in self._final else _part(final)), off, length

    def locate(self, chunk: str) -> Optional[tuple[Path, int, int]]:
        """Where a verified chunk can be read now (None: not held or not verified)."""
        with self._lock:
            return self._path_of(chunk) if chunk in self._verified else None

    def writer(self, m: ModelManifest, chunk: str) -> "ChunkWriter":
        rel, off, length = m.locations[chunk][0]
        return ChunkWriter(self, m, chunk, _part(self.model_dir(m) / rel), off, length)

    # ----- after a chunk is verified --------------------------------------------
    def _copy_to_locations(self, m: ModelManifest, chunk: str, src: tuple[Path, int, int]) -> None:
        """A chunk repeated inside the model (or held from another model) is written everywhere."""
        path, off, length = src
        d = self.model_dir(m)
        data: Optional[bytes] = None
        for rel, o, _ in m.locations[chunk]:
            dest = _part(d / rel)
            if dest == path and o == off:
                continue
            if data is None:
                with path.open("rb") as fh:
                    fh.seek(off)
                    data = fh.read(length)
            fd = os.open(dest, os.O_WRONLY)
            try:
                os.pwrite(fd, data, o)
            finally:
                os.close(fd)

    def _mark_verified(self, m: ModelManifest, chunk: str) -> None:
        rel, off, length = m.locations[chunk][0]
        with self._lock:
            self._verified.setdefault(chunk, (self.model_dir(m) / rel, off, length))
            self._missing[m.digest].discard(chunk)

    def _finish_model(self, m: ModelManifest) -> None:
        """Give every fully verified file its real name; mark the model complete."""
        d = self.model_dir(m)
        with self._lock:
            for f in m.files:
                final = d / f.path
                if final not in self._final and all(c in self._verified for c in f.chunks):
                    os.replace(_part(final), final)
                    self._final.add(final)
            if not self._missing[m.digest] and not (d / MARKER).exists():
                (d / MARKER).write_text(m.model_dump_json())

    def commit(self, m: ModelManifest, chunk: str, written: Path, offset: int, length: int) -> None:
        self._copy_to_locations(m, chunk, (written, offset, length))
        self._mark_verified(m, chunk)
        self._finish_model(m)


class ChunkFault(enum.Enum):
    SHORT = "short"  # fewer bytes than the chunk has
    CORRUPT = "corrupt"  # the bytes do not hash to the chunk's name


@dataclass(frozen=True)
class ChunkProblem:
    """Why a received chunk was not taken."""

    kind: ChunkFault
    message: str


class ChunkWriter:
    """Receives one chunk's bytes into place, hashing them as they come."""

    def __init__(self, store: ChunkStore, m: ModelManifest, chunk: str, path: Path, offset: int,
                 length: int) -> None:
        self.store, self.m, self.chunk = store, m, chunk
        self.path, self.offset, self.length = path, offset, length
        self.received = 0
        self._hash = hashlib.sha256()
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, data: memoryview) -> None:
        if self.received + len(data) > self.length:
            raise ValueError(f"source sent more than the chunk's {self.length} bytes")
        os.pwrite(self._fd, data, self.offset + self.received)
        self._hash.update(data)
        self.received += len(data)

    def commit(self) -> Optional[ChunkProblem]:
        """None when the chunk is whole and its hash matches (it is now served); else why not."""
        self.close()
        if self.received != self.length:
            return ChunkProblem(ChunkFault.SHORT, f"got {self.received} of {self.length} bytes")
        if self._hash.hexdigest() != self.chunk:
            return ChunkProblem(ChunkFault.CORRUPT, "sha256 mismatch: corrupt chunk")
        self.store.commit(self.m, self.chunk, self.path, self.offset, self.length)
        return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
