"""The seed papers' cluster, simulated: a discrete-event simulation that drives PCM's real
service core (SQLite state, leasing, exactly-once results, placement, the demand model) on a
simulated clock, the real factory (`factory.daemon.Factory`: its `decide()`, its demand
window) through a simulated batch system, and simulated workers that speak the worker
protocol to the core in-process.

    python -m bench.simulate [--rows 150000] [--seed 1] [--plot docs/simulation.png] [--sweep]

What is simulated: GPU slots that appear (a Poisson process, up to a maximum) and vanish
(evictions); a context start (the model from the shared filesystem, or from a peer once one
holds it, then loaded to the GPU: minutes); per-row service times for a few GPU speeds.
Scenarios, after the seed papers' 150,000-inference fact-verification run:

  static-reload  20 GPUs for the whole run, the model reloaded for every task (batch)
  static-kept    the same 20 GPUs, the context kept: one start per worker
  opportunistic  PCM's factory grows the pool to up to 186 GPUs as slots appear, evictions

``--sweep``: makespan against batch size with and without the context kept (20 GPUs).
Seeded and deterministic (worker ids come from the seed too).
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import random
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from factory.backends.base import Glidein, GlideinBackend, GlideinState
from factory.config import FactoryConfig
from factory.daemon import Factory
from pcm_service.cli.plots import draw_pool, draw_rows, pyplot
from pcm_service.core import ServiceConfig, ServiceCore, UnknownWorker
from pcm_service.protocol import (
    BatchReport,
    ContextSpec,
    ContextState,
    FactoryLimits,
    FactoryReport,
    Heartbeat,
    IdleReport,
    LeaseRequest,
    LibraryEvent,
    RowIn,
    RowResult,
    WorkerRegistration,
    WorkloadSubmission,
)
from tests.support.models import fake_model


@dataclass
class Scenario:
    name: str
    rows: int = 150_000
    batch_size: int = 100
    static_gpus: int = 0  # > 0: this many GPUs from the start to the end, no factory
    max_gpus: int = 186  # the factory's limit (opportunistic)
    reload_per_task: bool = False
    slot_rate: float = 0.5  # free slots appearing per second (opportunistic)
    eviction_rate: float = 1 / 3600  # per running glidein per second (opportunistic)
    speeds: list[tuple[float, float]] = field(default_factory=lambda: [(1.0, 2.8)])  # (share, rows/s)
    shared_fs_s: float = 60.0  # the model from the shared filesystem (one reader)
    shared_fs_readers: int = 8  # readers the shared filesystem serves at full speed
    peer_s: float = 20.0  # the model from a peer that holds it
    load_s: float = 48.0  # weights to GPU, engine ready
    seed: int = 1


class Sim:
    """The event loop and the clock the core reads."""

    def __init__(self, sc: Scenario, state: Path, model: Path) -> None:
        self.sc, self.t = sc, 0.0
        self.q: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.rng = random.Random(sc.seed)
        ids = random.Random(sc.seed + 1)
        uuid.uuid4 = lambda: uuid.UUID(int=ids.getrandbits(128), version=4)  # deterministic ids
        self.core = ServiceCore(state, ServiceConfig(heartbeat_interval=30, worker_timeout=120, idle_timeout=60,
                                                     model_roots=(model.parent,)), clock=lambda: self.t)
        self.workers: dict[str, SimWorker] = {}
        self.holders = 0  # workers whose disk holds the model (peers to copy it from)
        self.fs_readers = 0
        self.rows_done = 0  # first results the core accepted: the run ends when all rows have one
        self.trace: list[tuple[float, int, int, int]] = []  # (t, GPUs held, with an engine, rows done)

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.q, (self.t + delay, next(self.seq), fn))

    def run(self, done: Callable[[], bool], limit: float = 7 * 86400) -> None:
        while self.q and not done() and self.t < limit:
            self.t, _, fn = heapq.heappop(self.q)
            fn()

    def pool(self) -> tuple[int, int]:
        """GPUs held by workers, and those with an engine loaded."""
        live = [w for w in self.workers.values() if not w.gone]
        return len(live), sum(w.ready for w in live)

    def fetch_time(self) -> float:
        """The model to this worker's disk: from a peer once one holds it, else the shared
        filesystem, slower with more readers than it serves at full speed."""
        sc = self.sc
        if self.holders and not sc.reload_per_task:
            return sc.peer_s * self.rng.uniform(0.8, 1.2)
        share = max(1.0, self.fs_readers / sc.shared_fs_readers)
        return sc.shared_fs_s * share * self.rng.uniform(0.8, 1.2)


class SimWorker:
    """A worker agent: told its context, fetches and loads it, keeps two batches on its GPU,
    reports each as it finishes, heartbeats, retires when idle; evicted, it just vanishes."""

    def __init__(self, sim: Sim, glidein_id: Optional[str], speed: float) -> None:
        self.sim, self.core, self.speed = sim, sim.core, speed
        self.wid = self.core.register(WorkerRegistration(host="gpu", pid=1, glidein_id=glidein_id)).worker_id
        sim.workers[self.wid] = self
        self.ctx: Optional[ContextSpec] = None
        self.cstate = ContextState.ABSENT
        self.ready = self.gone = self.draining = False
        self.inflight: list[Any] = []
        self.gpu_free = 0.0
        self.seq = 0
        self.idle_since: Optional[float] = None
        sim.at(0.0, self.ask)
        sim.at(sim.rng.uniform(0, 30), self.heartbeat)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(self.wid, *args)
        except UnknownWorker:  # the service gave up on it: it is gone
            self.leave(deregister=False)
            return None

    def ask(self) -> None:
        if self.gone:
            return
        resp = self.call(self.core.lease_batch, LeaseRequest(max_batches=0))
        if resp is None:
            return
        if resp.assign_context is None:
            return self.idle()
        self.ctx = resp.assign_context
        self.sim.fs_readers += 1
        self.event(ContextState.FETCHING)
        self.sim.at(self.sim.fetch_time(), self.fetched)

    def fetched(self) -> None:
        self.sim.fs_readers -= 1
        if self.gone:
            return
        self.sim.holders += 1
        self.event(ContextState.LOADING)
        self.sim.at(self.sim.sc.load_s * self.sim.rng.uniform(0.8, 1.2), self.loaded)

    def loaded(self) -> None:
        if self.gone:
            return
        self.ready = True
        self.event(ContextState.READY, self.sim.sc.load_s)
        self.pump()

    def event(self, state: ContextState, seconds: float = 0.0) -> None:
        assert self.ctx is not None
        self.cstate = state
        self.call(self.core.library_event, LibraryEvent(context_id=self.ctx.context_id, state=state, seconds=seconds))

    def pump(self) -> None:
        """Lease what keeps two batches on the GPU (one under reload-per-task)."""
        if self.gone or not self.ready or self.draining:
            return
        want = (1 if self.sim.sc.reload_per_task else 2) - len(self.inflight)
        if want <= 0:
            return
        assert self.ctx is not None
        resp = self.call(self.core.lease_batch, LeaseRequest(
            context_id=self.ctx.context_id, context_state=ContextState.READY, max_batches=want))
        if resp is None:
            return
        self.seq = resp.lease_seq
        for b in resp.batches:
            self.gpu_free = max(self.gpu_free, self.sim.t) + len(b.rows) / self.speed
            self.inflight.append(b)
            self.sim.at(self.gpu_free - self.sim.t, partial(self.finish, b))
        if not self.inflight:
            self.idle()

    def finish(self, b: Any) -> None:
        if self.gone or b not in self.inflight:
            return
        self.inflight.remove(b)
        resp = self.call(self.core.report, BatchReport(batch_id=b.batch_id, results=[
            RowResult(idx=r.idx, text="True", finish_reason="stop") for r in b.rows]))
        if resp is not None:
            self.sim.rows_done += resp.accepted
        if self.draining and not self.inflight:
            return self.leave()
        if self.sim.sc.reload_per_task:  # the baseline: a fresh engine for the next task
            self.ready = False
            self.sim.fs_readers += 1
            self.event(ContextState.FETCHING)
            self.sim.at(self.sim.fetch_time(), self.fetched)
            return
        self.pump()

    def idle(self) -> None:
        if self.idle_since is None:
            self.idle_since = self.sim.t
        self.sim.at(5.0, self.idle_check)

    def idle_check(self) -> None:
        if self.gone or self.inflight:
            self.idle_since = None
            return
        if self.ready:
            self.pump()
            if self.inflight:
                self.idle_since = None
                return
        elif self.ctx is None:
            resp = self.call(self.core.lease_batch, LeaseRequest(max_batches=0))
            if resp is not None and resp.assign_context is not None:
                self.idle_since = None
                return self.ask()
        assert self.idle_since is not None
        if self.sim.t - self.idle_since >= self.core.config.idle_timeout:
            decision = self.call(self.core.idle, IdleReport(idle_seconds=self.sim.t - self.idle_since))
            if decision is not None and decision.retire:
                return self.leave()
            self.idle_since = self.sim.t
        self.sim.at(5.0, self.idle_check)

    def heartbeat(self) -> None:
        if self.gone:
            return
        resp = self.call(self.core.heartbeat, Heartbeat(
            context_id=self.ctx.context_id if self.ctx else None, context_state=self.cstate,
            inflight_batches=len(self.inflight), batches=[b.batch_id for b in self.inflight],
            lease_seq=self.seq, draining=self.draining))
        if resp is not None and resp.retire:
            self.drain()
        self.sim.at(self.core.config.heartbeat_interval, self.heartbeat)

    def drain(self) -> None:
        """SIGTERM (the factory removed its glidein) or the service's retire: finish, then go."""
        self.draining = True
        if not self.inflight:
            self.leave()

    def leave(self, deregister: bool = True) -> None:
        if self.gone:
            return
        self.gone = True
        if self.ready or self.ctx:
            self.sim.holders = max(0, self.sim.holders - 1)
        if deregister:
            self.core.retire(self.wid)
        self.on_exit()

    def vanish(self) -> None:
        """Evicted: the slot is gone at once; the service learns it from the factory's report."""
        if not self.gone:
            self.gone = True
            self.sim.holders = max(0, self.sim.holders - 1)
            self.on_exit()

    def on_exit(self) -> None:  # the batch system's view (SimPool sets it)
        pass


class SimPool(GlideinBackend):
    """A batch system whose free GPU slots appear as a Poisson process; a glidein waits idle for
    one, runs its worker, and is evicted at ``eviction_rate``."""

    name = "sim"

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.n = itertools.count(1)
        self.jobs: dict[str, Glidein] = {}
        self.worker_of: dict[str, SimWorker] = {}
        self.exited: list[Glidein] = []
        self.running = 0
        sim.at(sim.rng.expovariate(sim.sc.slot_rate), self.slot_appears)

    @classmethod
    def from_config(cls, config: FactoryConfig) -> "SimPool":
        raise NotImplementedError("built by the simulation")

    def submit(self, count: int) -> list[str]:
        ids = [f"sim.{next(self.n)}" for _ in range(count)]
        for gid in ids:
            self.jobs[gid] = Glidein(glidein_id=gid, state=GlideinState.IDLE, since=self.sim.t)
        return ids

    def glideins(self) -> list[Glidein]:
        out = list(self.jobs.values()) + self.exited
        self.exited = []
        return out

    def remove(self, glidein_ids: list[str]) -> None:
        for gid in glidein_ids:
            g = self.jobs.get(gid)
            if g is None:
                continue
            if g.state == GlideinState.IDLE:
                self.exit(gid, "removed while idle")
            else:
                self.worker_of[gid].drain()

    def slot_appears(self) -> None:
        sc, sim = self.sim.sc, self.sim
        waiting = [g for g in self.jobs.values() if g.state == GlideinState.IDLE]
        if waiting and self.running < sc.max_gpus:
            g = waiting[0]
            g.state, g.since = GlideinState.RUNNING, sim.t
            self.running += 1
            w = SimWorker(sim, g.glidein_id, pick_speed(sim.rng, sc.speeds))
            w.on_exit = partial(self.exit, g.glidein_id, "worker exited")  # type: ignore[method-assign]
            self.worker_of[g.glidein_id] = w
            sim.at(sim.rng.expovariate(sc.eviction_rate), w.vanish)
        sim.at(sim.rng.expovariate(sc.slot_rate), self.slot_appears)

    def exit(self, gid: str, why: str) -> None:
        g = self.jobs.pop(gid, None)
        if g is None:
            return
        if g.state == GlideinState.RUNNING:
            self.running -= 1
        self.exited.append(Glidein(glidein_id=gid, state=GlideinState.EXITED, detail=why, since=self.sim.t))


class InProcessClient:
    """What the factory asks the service, answered by the core in this process (no HTTP)."""

    def __init__(self, core: ServiceCore) -> None:
        self.core = core

    def request(self, method: str, path: str, body: Any = None, response: Any = None, **_: Any) -> Any:
        if (method, path) == ("GET", "/status"):
            return self.core.status()
        if (method, path) == ("POST", "/factory/report"):
            assert isinstance(body, FactoryReport)
            return self.core.factory_report(body)
        raise NotImplementedError(f"{method} {path}")


def pick_speed(rng: random.Random, speeds: list[tuple[float, float]]) -> float:
    x, acc = rng.random(), 0.0
    for share, rate in speeds:
        acc += share
        if x <= acc:
            return rate
    return speeds[-1][1]


def simulate(sc: Scenario, work: Path) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(dir=work))
    model = work / "models" / "m"
    sim = Sim(sc, state / "state", model)
    core = sim.core
    sub = core.submit(WorkloadSubmission(
        name=sc.name, context=ContextSpec(model=str(model)), batch_size=sc.batch_size,
        output=str(state / "out.jsonl"), rows=[RowIn(row_id=str(i), prompt="claim") for i in range(sc.rows)]))
    pool: Optional[SimPool] = None
    if sc.static_gpus:
        for _ in range(sc.static_gpus):
            SimWorker(sim, None, pick_speed(sim.rng, sc.speeds))
    else:
        pool = SimPool(sim)
        core.set_factory_limits(FactoryLimits(min_workers=0, max_workers=sc.max_gpus, per_cycle=32))
        factory = Factory(InProcessClient(core), pool, FactoryConfig(  # type: ignore[arg-type]
            name="sim", interval=15.0, max_idle=64, idle_grace=30.0, scale_down_delay=60.0),
            clock=lambda: sim.t)

        def cycle() -> None:
            factory.cycle()
            sim.at(factory.config.interval, cycle)
        sim.at(0.0, cycle)

    def housekeeping() -> None:
        core.reap()
        sim.trace.append((sim.t, *sim.pool(), sim.rows_done))
        sim.at(10.0, housekeeping)
    sim.at(0.0, housekeeping)
    sim.run(lambda: sim.rows_done >= sc.rows)
    st = core.workload_status(sub.workload_id)
    assert st.state.value == "completed", st
    starts = sum(core.library_starts().values())
    sim.trace.append((sim.t, *sim.pool(), st.rows_done))
    result = {"scenario": sc.name, "batch_size": sc.batch_size, "makespan_min": sim.t / 60,
              "rows": st.rows_done, "failed": st.rows_failed, "engine_starts": starts,
              "peak_gpus": max(g for _, g, _, _ in sim.trace), "history": core.history()}
    core.close()
    shutil.rmtree(state, ignore_errors=True)
    return result


SCENARIOS = {
    "static-reload": dict(static_gpus=20, reload_per_task=True),
    "static-kept": dict(static_gpus=20),
    # the pool's GPUs are of several generations: a third as fast as the static ones' ...
    "opportunistic": dict(speeds=[(0.4, 2.8), (0.6, 1.2)], slot_rate=0.8),
}
PAPER_MIN = {"static-reload": 180, "static-kept": 48, "opportunistic": 13}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Each scenario's pool by worker state and rows done, drawn by `pcm report`'s own code
    from the service's records of the simulated run."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 6.4), squeeze=False)
    for col, r in enumerate(results):
        draw_pool(axes[0][col], r["history"])
        axes[0][col].set_title(f"{r['scenario']}: {r['makespan_min']:.0f} min")
        draw_rows(axes[1][col], r["history"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=150_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--plot", type=Path, help="write the pool size and rows done over time here (PNG)")
    p.add_argument("--sweep", action="store_true", help="makespan against batch size, context kept or not")
    p.add_argument("--batch-sizes", default="25,50,100,200,400")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="which of " + ", ".join(SCENARIOS))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pcm-sim-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    fake_model(work / "models" / "m")
    try:
        results = []
        print(f"{'scenario':<15} {'makespan min':>12} {'paper min':>9} {'ratio':>6} {'engine starts':>13}"
              f" {'peak GPUs':>9} {'rows':>8}", flush=True)
        for name in args.scenarios.split(","):
            over = SCENARIOS[name]
            r = simulate(Scenario(name=name, rows=args.rows, seed=args.seed, **over), work)  # type: ignore[arg-type]
            results.append(r)
            paper = PAPER_MIN[name] * args.rows / 150_000 if name != "opportunistic" else PAPER_MIN[name]
            print(f"{name:<15} {r['makespan_min']:12.1f} {paper:9.0f} {r['makespan_min'] / paper:6.2f}"
                  f" {r['engine_starts']:13d} {r['peak_gpus']:9d} {r['rows']:8d}", flush=True)
        if args.plot:
            plot(results, args.plot)
            print(f"plot: {args.plot}")
        if args.sweep:
            print(f"\n{'batch size':>10} {'kept min':>9} {'reload min':>10}")
            for b in [int(x) for x in args.batch_sizes.split(",")]:
                kept = simulate(Scenario(name="kept", rows=args.rows, batch_size=b, seed=args.seed,
                                         static_gpus=20), work)
                reload = simulate(Scenario(name="reload", rows=args.rows, batch_size=b, seed=args.seed,
                                           static_gpus=20, reload_per_task=True), work)
                print(f"{b:10d} {kept['makespan_min']:9.1f} {reload['makespan_min']:10.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
