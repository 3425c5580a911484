"""The replica map: which worker holds which model chunk, and who fetches what from whom.

A newcomer asks for a transfer plan; chunks go rarest first, each from a live
peer with a free upload slot, and from the origin (the service's copy) only when
no peer can serve it. A finished chunk makes its receiver a source at once, so
copies spread like a swarm. Sources that fail are avoided for a while; a peer
that served corrupt bytes loses that replica.
"""
from __future__ import annotations

import logging
import random
import sqlite3
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    ORIGIN,
    BootstrapFetchRequest,
    ChunkAssignment,
    EnvironmentFetch,
    FetchPlan,
    FetchProgress,
    FetchRequest,
    ModelManifest,
    TransferResult,
    TransferStats,
    WorkerEnvironment,
    WorkerRegistration,
)
from pcm_service.store import Store
from pcm_service.weights.chunks import (
    DEFAULT_CHUNK_SIZE,
    ModelFiles,
    RateLimiter,
    build_manifest,
    stat_signature,
    swarm_chunk_size,
)
from pcm_service.weights.modelpaths import ModelPolicy, ModelUnavailable

log = logging.getLogger("pcm.replicas")
CORRUPT_REPORTERS = 2  # distinct hosts (else workers) that must find a source's copy corrupt before it is dropped
MAX_ADDRESSES = 100_000  # addresses whose fetched chunks are remembered
MAX_EXPIRED = 100_000  # timed-out transfers whose late results are still believed
ERROR_KEPT = 500  # characters of a worker's transfer error kept in the transfers table
BOOTSTRAP_SILENCE = 60.0  # a bootstrapping glidein silent this long is gone (it asks every second)


@dataclass
class TransferPolicy:
    chunk_size: int = DEFAULT_CHUNK_SIZE  # the largest chunk
    min_chunks: int = 64  # smaller models get smaller chunks (down to 1 MiB), for the swarm
    origin_slots: int = 4  # transfers the origin serves at once
    origin_rate: float = 0.0  # the origin's upload bytes/s, 0: unlimited
    origin_copies: int = 2  # the origin sends a chunk at most this often while peers hold it
    avoid_seconds: float = 30.0  # a source that failed gets no new transfers for this long
    transfer_timeout: float = 300.0  # a transfer with no result after this frees its slot


class _Active(NamedTuple):
    source: str
    started: float


class _Holder(NamedTuple):
    worker_id: str
    url: str
    slots: int


def printable(text: str) -> str:
    """A worker's string made safe for one log line: control characters (newlines, ESC) escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def held_by(db: sqlite3.Connection, worker_id: str) -> set[str]:
    """The chunks a worker holds as far as its own placement and fetches go: those it fetched,
    and those it said it had at registration (its own cache is its own business)."""
    return {r[0] for r in db.execute("SELECT chunk FROM replicas WHERE worker_id=?"
                                     " UNION SELECT chunk FROM claimed_chunks WHERE worker_id=?",
                                     (worker_id, worker_id))}


class ReplicaMap:
    def __init__(self, store: Store, policy: TransferPolicy, clock: Callable[[], float],
                 models: ModelPolicy = ModelPolicy()) -> None:
        self.store = store
        self.policy = policy
        self.models = models
        self.clock = clock
        self.origin_limiter = RateLimiter(policy.origin_rate)
        self.on_change: Callable[[], None] = lambda: None  # the HTTP layer wakes long polls here
        self._lock = threading.Lock()
        self._manifests: dict[str, ModelManifest] = {}
        self._origin: dict[str, tuple[Path, int, int]] = {}  # chunk → where the origin has it
        self._active: dict[tuple[str, str], _Active] = {}  # (receiver, chunk) → source
        self._avoid: dict[str, float] = {}  # source → until when
        self._origin_copies: Counter[str] = Counter()
        self._fetching: dict[str, str] = {}  # worker → manifest digest it is fetching
        self._booting: dict[str, tuple[float, Optional[str]]] = {}  # bootstrapping → (last call, glidein)
        self._expired: dict[tuple[str, str], str] = {}  # (receiver, chunk) → source, timed out
        # chunks fetched and verified by workers that have left, per address: what a newcomer
        # there (the worker its glidein's bootstrap starts) is believed to hold
        self._proven: dict[str, set[str]] = {}
        self._addresses: dict[str, str] = {}  # worker or bootstrapping glidein → the address it calls from
        self._reporters: dict[tuple[str, str], set[str]] = {}  # (chunk, source) → the addresses that found it corrupt
        self.environment: Optional[WorkerEnvironment] = None
        self._load_models()

    # ----- models ----------------------------------------------------------------
    def _load_models(self) -> None:
        """Index the stored manifests; one whose directory now breaks the model policy is dropped."""
        with self.store.read() as db:
            rows = db.execute("SELECT digest, path, manifest FROM models").fetchall()
        dropped = []
        for r in rows:
            if Path(r["path"]).is_file():
                continue  # an environment archive: indexed when the service is started with it
            m = ModelManifest.model_validate_json(r["manifest"])
            try:
                files = self.models.check(r["path"])
                missing = [f.path for f in m.files if f.path not in files]
                if missing:
                    raise ModelUnavailable(f"{missing[0]} is no longer a regular file of the model")
            except ModelUnavailable as e:
                log.warning("dropping the manifest of model %s (%s…): %s", r["path"], r["digest"][:16], e)
                dropped.append(r["digest"])
                continue
            self._index(m, files)
        if dropped:
            with self.store.transaction() as db:
                db.executemany("DELETE FROM models WHERE digest=?", ((d,) for d in dropped))

    def _index(self, m: ModelManifest, files: ModelFiles) -> None:
        self._manifests[m.digest] = m
        for chunk, locs in m.locations.items():
            rel, off, length = locs[0]
            self._origin[chunk] = (files[rel], off, length)

    def register_environment(self, archive: Path) -> WorkerEnvironment:
        """Make the packed worker environment an origin copy, shipped in chunks like weights."""
        real = archive.resolve()
        m = self._register(str(real), {archive.name: real})
        self.environment = WorkerEnvironment(digest=m.digest, archive=archive.name, bytes=m.total_bytes)
        return self.environment

    def register_model(self, path: str | Path) -> ModelManifest:
        """Make a model directory an origin copy (only if the model policy allows it); its
        manifest is rebuilt only when the files changed. Raises ModelUnavailable."""
        return self._register(str(Path(path).resolve()), self.models.check(path))

    def _register(self, real: str, files: ModelFiles) -> ModelManifest:
        sig = stat_signature(files)
        size = self.policy.chunk_size
        with self.store.read() as db:
            row = db.execute("SELECT digest, manifest FROM models WHERE path=? AND signature=? AND chunk_size=?",
                             (real, sig, size)).fetchone()
        if row is not None:  # indexed again: the origin serves the files just checked (their inodes)
            with self._lock:
                self._index(self._manifests.get(row["digest"]) or ModelManifest.model_validate_json(row["manifest"]),
                            files)
            return self._manifests[row["digest"]]
        total = sum(f.stat().st_size for f in files.values())
        m = build_manifest(files, swarm_chunk_size(total, size, self.policy.min_chunks))
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO models VALUES (?,?,?,?,?,?)",
                       (m.digest, real, sig, size, m.model_dump_json(), self.clock()))
        with self._lock:
            self._index(m, files)
        log.info("model %s: manifest %s, %d files, %d chunks, %.1f MiB", real, m.digest[:16],
                 len(m.files), len(m.chunk_lengths), m.total_bytes / 2**20)
        return m

    def manifest(self, digest: str) -> ModelManifest:
        return self._manifests[digest]  # KeyError: unknown model

    def origin_location(self, chunk: str) -> Optional[tuple[Path, int, int]]:
        return self._origin.get(chunk)

    # ----- workers ---------------------------------------------------------------
    def add_worker(self, db: sqlite3.Connection, worker_id: str, reg: WorkerRegistration,
                   address: Optional[str] = None) -> None:
        """What a worker says it holds places it (and spares it fetching its own cache again),
        but it is a source for others only for chunks the service saw fetched and verified at
        its address (by its glidein's bootstrap, or a worker there before it): see _record."""
        if reg.blob_url and reg.upload_slots > 0:
            db.execute("INSERT OR REPLACE INTO peers VALUES (?,?,?)",
                       (worker_id, reg.blob_url.rstrip("/"), reg.upload_slots))
        known = {c for c in set(reg.chunks) if c in self._origin}
        proven = known & self._proven.get(address, set()) if address else set()
        db.executemany("INSERT OR IGNORE INTO replicas VALUES (?, ?)", ((c, worker_id) for c in proven))
        db.executemany("INSERT OR IGNORE INTO claimed_chunks VALUES (?, ?)",
                       ((c, worker_id) for c in known - proven))
        if address:
            self._addresses[worker_id] = address

    def drop_worker(self, worker_id: str) -> None:
        """A worker left: it neither holds nor fetches anything any more."""
        with self._lock:
            for key, t in list(self._active.items()):
                if worker_id in (key[0], t.source):
                    self._release(key)
            self._fetching.pop(worker_id, None)
            with self.store.transaction() as db:
                address = self._addresses.pop(worker_id, None)
                if address is not None and (address in self._proven or len(self._proven) < MAX_ADDRESSES):
                    self._proven.setdefault(address, set()).update(
                        r[0] for r in db.execute("SELECT chunk FROM replicas WHERE worker_id=?", (worker_id,)))
                db.execute("DELETE FROM replicas WHERE worker_id=?", (worker_id,))
                db.execute("DELETE FROM claimed_chunks WHERE worker_id=?", (worker_id,))
                db.execute("DELETE FROM peers WHERE worker_id=?", (worker_id,))
            self._reporters = {k: v for k, v in self._reporters.items() if k[1] != worker_id}
            self._expired = {k: v for k, v in self._expired.items() if worker_id not in (k[0], v)}
        self.on_change()

    # ----- glideins bootstrapping ------------------------------------------------
    def plan_bootstrap(self, receiver: str, req: BootstrapFetchRequest, address: Optional[str] = None) -> FetchPlan:
        """A plan for a glidein fetching the environment before it runs a worker; while it
        keeps asking, the chunks it verified are offered to others from its own server."""
        if self.environment is None or req.manifest_digest != self.environment.digest:
            raise KeyError(req.manifest_digest)
        now = self.clock()
        for r, (seen, _) in list(self._booting.items()):
            if now - seen > BOOTSTRAP_SILENCE:
                self.end_bootstrap(r)
        self._booting[receiver] = (now, req.glidein_id)
        if address:
            self._addresses[receiver] = address
        if req.blob_url and req.upload_slots > 0:
            with self.store.transaction() as db:
                db.execute("INSERT OR REPLACE INTO peers VALUES (?,?,?)",
                           (receiver, req.blob_url.rstrip("/"), req.upload_slots))
        # the origin sends the environment only where no peer has it: a wave of glideins must
        # not all pull it from the submit host (the weights' origin_copies rule lets it help)
        return self.plan(receiver, FetchRequest(manifest_digest=req.manifest_digest, results=req.results,
                                                want=req.want), origin_copies=0)

    def end_bootstrap(self, receiver: str) -> None:
        self._booting.pop(receiver, None)
        self.drop_worker(receiver)

    def bootstrap_progress(self) -> list[EnvironmentFetch]:
        out = []
        for r, (_, glidein) in list(self._booting.items()):
            p = self.progress(r)
            if p is not None:
                out.append(EnvironmentFetch(receiver=r, glidein_id=glidein, progress=p))
        return out

    # ----- planning --------------------------------------------------------------
    def plan(self, worker_id: str, req: FetchRequest, origin_copies: Optional[int] = None) -> FetchPlan:
        m = self.manifest(req.manifest_digest)
        lengths = m.chunk_lengths
        with self._lock:
            now = self.clock()
            with self.store.transaction() as db:
                for r in req.results:
                    self._record(db, worker_id, r, now)
                self._fetching[worker_id] = m.digest
                for key, t in list(self._active.items()):
                    if now - t.started > self.policy.transfer_timeout:
                        self._release(key)  # its slot is free; a late result is still believed
                        if len(self._expired) < MAX_EXPIRED:
                            self._expired[key] = t.source
                held = self._held(db, worker_id, lengths)
                copies = self.policy.origin_copies if origin_copies is None else origin_copies
                out = self._assign(db, worker_id, lengths, held, req.want, now, copies) if req.want else []
            progress = self._progress(worker_id, m, lengths, held)
        if req.results:
            self.on_change()
        return FetchPlan(assignments=out, progress=progress)

    def _held(self, db: sqlite3.Connection, worker_id: str, lengths: dict[str, int]) -> set[str]:
        return {c for c in held_by(db, worker_id) if c in lengths}

    def _assign(self, db: sqlite3.Connection, worker_id: str, lengths: dict[str, int],
                held: set[str], want: int, now: float, origin_copies: int) -> list[ChunkAssignment]:
        mine = {c for (w, c) in self._active if w == worker_id}
        needed = [c for c in lengths if c not in held and c not in mine]
        if not needed:
            return []
        holders: dict[str, list[_Holder]] = defaultdict(list)
        live = {s.value for s in LIVE_WORKER_STATES}
        for r in db.execute("SELECT r.chunk, r.worker_id, p.url, p.slots, w.state FROM replicas r"
                            " JOIN peers p USING (worker_id) LEFT JOIN workers w USING (worker_id)"
                            " WHERE r.worker_id != ?", (worker_id,)):
            if r["chunk"] in lengths and (r["state"] in live or r["worker_id"] in self._booting):
                holders[r["chunk"]].append(_Holder(r["worker_id"], r["url"], r["slots"]))
        load = Counter(t.source for t in self._active.values())
        inflight = Counter(c for (_, c) in self._active)
        random.shuffle(needed)
        needed.sort(key=lambda c: len(holders[c]) + inflight[c])  # rarest first
        out: list[ChunkAssignment] = []
        for c in needed:
            if len(out) >= want:
                break
            usable = [h for h in holders[c] if self._avoid.get(h.worker_id, 0.0) <= now]
            free = [h for h in usable if load[h.worker_id] < h.slots]
            url: Optional[str] = None
            if free:
                h = min(free, key=lambda h: (load[h.worker_id], random.random()))
                source, url = h.worker_id, h.url
            elif load[ORIGIN] < self.policy.origin_slots and (
                    not usable or self._origin_copies[c] < origin_copies):
                source = ORIGIN
                self._origin_copies[c] += 1
            else:
                continue  # peers hold it but are busy: wait for a slot rather than load the origin
            load[source] += 1
            self._active[(worker_id, c)] = _Active(source, now)
            out.append(ChunkAssignment(chunk=c, length=lengths[c], source=source, url=url))
        return out

    def _release(self, key: tuple[str, str]) -> None:
        t = self._active.pop(key, None)
        if t is not None and t.source == ORIGIN and self._origin_copies[key[1]] > 0:
            self._origin_copies[key[1]] -= 1

    def _record(self, db: sqlite3.Connection, worker_id: str, r: TransferResult, now: float) -> None:
        """A transfer's result, believed only for a transfer the service planned: that worker,
        that chunk, that source. Anything else is dropped (a worker may not make itself a
        holder of chunks it never fetched, nor blame a source it was not sent to)."""
        key = (worker_id, r.chunk)
        t = self._active.get(key)
        source = t.source if t is not None else self._expired.get(key)
        if source != r.source:
            log.warning("%s reported a transfer of %s… from %s that was not planned: ignored",
                        worker_id, r.chunk[:12], printable(r.source))
            return
        self._active.pop(key, None)
        self._expired.pop(key, None)
        length = self._origin[r.chunk][2] if r.chunk in self._origin else 0
        db.execute("INSERT INTO transfers (worker_id, source, chunk, bytes, seconds, ok, error, at)"
                   " VALUES (?,?,?,?,?,?,?,?)",
                   (worker_id, r.source, r.chunk, min(r.bytes, length), r.seconds, int(r.ok),
                    printable(r.error)[:ERROR_KEPT] if r.error else None, now))
        if r.ok:
            db.execute("INSERT OR IGNORE INTO replicas VALUES (?, ?)", (r.chunk, worker_id))
            return
        if t is not None and t.source == ORIGIN and self._origin_copies[r.chunk] > 0:
            self._origin_copies[r.chunk] -= 1  # the origin may send that copy again
        if r.source != ORIGIN and not r.busy:
            self._avoid[r.source] = now + self.policy.avoid_seconds
            log.warning("%s could not get chunk %s… from %s (%s): avoiding that source for %.0fs",
                        worker_id, r.chunk[:12], r.source, printable(r.error or "")[:200],
                        self.policy.avoid_seconds)
        if r.corrupt and r.source != ORIGIN:
            # one host's word does not take a replica away: it may be lying about the source (and
            # a glidein's bootstrap and its worker, or several workers on one host, are one word)
            reporters = self._reporters.setdefault((r.chunk, r.source), set())
            reporters.add(self._addresses.get(worker_id, worker_id))
            if len(reporters) >= CORRUPT_REPORTERS:
                db.execute("DELETE FROM replicas WHERE chunk=? AND worker_id=?", (r.chunk, r.source))
                del self._reporters[(r.chunk, r.source)]

    # ----- status ----------------------------------------------------------------
    def _progress(self, worker_id: str, m: ModelManifest, lengths: dict[str, int],
                  held: set[str]) -> FetchProgress:
        sources = {t.source for (w, _), t in self._active.items() if w == worker_id}
        return FetchProgress(manifest_digest=m.digest, chunks_held=len(held), chunks_total=len(lengths),
                             bytes_held=sum(lengths[c] for c in held), bytes_total=m.total_bytes,
                             sources=len(sources))

    def progress(self, worker_id: str) -> Optional[FetchProgress]:
        digest = self._fetching.get(worker_id)
        if digest is None:
            return None
        m = self.manifest(digest)
        lengths = m.chunk_lengths
        with self._lock:
            with self.store.read() as db:
                held = self._held(db, worker_id, lengths)
            return self._progress(worker_id, m, lengths, held)

    def stats(self) -> TransferStats:
        st = TransferStats(active=len(self._active))
        with self.store.read() as db:
            for r in db.execute("SELECT source=? AS origin, SUM(bytes) AS b, COUNT(*) AS n,"
                                " SUM(1-ok) AS f FROM transfers GROUP BY origin", (ORIGIN,)):
                if r["origin"]:
                    st.origin_bytes = r["b"] or 0
                else:
                    st.peer_bytes = r["b"] or 0
                st.transfers += r["n"]
                st.failures += r["f"] or 0
        return st
