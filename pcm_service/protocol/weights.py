"""Model weights on the wire: manifests of content-addressed chunks and transfer plans."""
from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Optional

from pydantic import Field

from pcm_service.protocol.base import BlobURL, Chunk, Count, FilePath, Ident, Message, Positive, Strict

ORIGIN = "origin"  # the source name of the service's own copy of a model


class ModelFile(Strict):
    path: str  # relative to the model directory
    size: Count
    chunks: list[str] = Field(default_factory=list)  # sha256 of each chunk_size piece, in order


class ModelManifest(Strict):
    """A model directory as content-addressed chunks: what a worker fetches and verifies."""

    chunk_size: Positive
    files: list[ModelFile]

    # derived once per manifest (they are read on every plan and every chunk received)
    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @cached_property
    def locations(self) -> dict[str, list[tuple[str, int, int]]]:
        """chunk → every (file, offset, length) holding it (identical pieces share a chunk)."""
        out: dict[str, list[tuple[str, int, int]]] = {}
        for f in self.files:
            for i, c in enumerate(f.chunks):
                off = i * self.chunk_size
                out.setdefault(c, []).append((f.path, off, min(self.chunk_size, f.size - off)))
        return out

    @cached_property
    def chunk_lengths(self) -> dict[str, int]:
        return {c: locs[0][2] for c, locs in self.locations.items()}


class ModelRegistration(Strict):
    path: FilePath  # a model directory readable by the service: it becomes an origin copy


class TransferResult(Strict):
    """What a worker says of one transfer the service planned for it: believed only for that
    plan's chunk and source (see ReplicaMap._record)."""

    chunk: Chunk
    source: Ident  # a worker id or ORIGIN
    ok: bool
    bytes: Count = 0  # recorded as at most the chunk's length
    seconds: float = Field(default=0.0, ge=0, le=86400)
    error: Optional[Message] = None
    corrupt: bool = False  # the bytes did not match the chunk's hash
    busy: bool = False  # the source refused: all its upload slots were taken


class FetchRequest(Strict):
    manifest_digest: Ident
    results: list[TransferResult] = Field(default_factory=list, max_length=1024)
    want: Count = 0  # how many more transfers the worker can run now
    wait: float = Field(default=0.0, ge=0, le=30)  # block this long for a free source


class BootstrapFetchRequest(FetchRequest):
    """A glidein bootstrapping its environment (no worker yet): it may pass chunks on at once."""

    blob_url: Optional[BlobURL] = None
    upload_slots: Count = Field(default=0, le=64)
    glidein_id: Optional[Ident] = None  # the batch job it runs in, when it knows


class WorkerEnvironment(Strict):
    """The packed environment workers run in (``pcm serve --worker-env``): what a bootstrap fetches."""

    digest: str  # its manifest's digest: contexts and node caches are keyed by it
    archive: str  # the archive's file name
    bytes: Count


class ChunkAssignment(Strict):
    chunk: str
    length: Count
    source: str
    url: Optional[str] = None  # None: the origin, i.e. the service the worker talks to


class FetchProgress(Strict):
    manifest_digest: str
    chunks_held: Count
    chunks_total: Count
    bytes_held: Count
    bytes_total: Count
    sources: Count  # distinct sources of the transfers in flight


class FetchPlan(Strict):
    assignments: list[ChunkAssignment] = Field(default_factory=list)
    progress: FetchProgress


class EnvironmentFetch(Strict):
    """A glidein fetching the packed environment, before its worker exists (`pcm status`)."""

    receiver: str
    glidein_id: Optional[str] = None
    progress: FetchProgress


class TransferStats(Strict):
    origin_bytes: Count = 0
    peer_bytes: Count = 0
    transfers: Count = 0
    failures: Count = 0
    active: Count = 0
