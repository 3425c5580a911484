"""The factory against a real HTCondor pool (minicondor in a chroot, tests/htcondor_pool/).

Real schedd, real glideins running worker_image/entry.sh with this checkout's venv, the
real vLLM CPU engine, a real `pcm serve` that requires the pool token.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from pcm_service.client import ServiceClient
from pcm_service.protocol import (
    ORIGIN,
    FactoryView,
    ModelManifest,
    ServiceStatus,
    SubmitResponse,
    TaskVineStatus,
    WorkloadStatus,
)
from pcm_service.workload import load_workload
from tests.htcondor_pool.fixtures import REPO, FactoryProcess, PoolHandle, pool_factory_config
from tests.support.models import ENGINE, reference_texts
from tests.support.serve import MODEL_ROOTS, ServeProcess
from tests.support.state import db
from tests.support.waiting import wait_for

pytestmark = pytest.mark.htcondor

SAMPLING = {"temperature": 0, "max_tokens": 48}
ALIVE = (1, 2)  # JobStatus idle, running


@pytest.fixture
def pool_model(pool: PoolHandle, tiny_model: Path) -> Path:
    """The tiny model where glideins can read it (the pool's shared directory)."""
    dst = pool.share / "models" / tiny_model.name
    if not dst.exists():
        shutil.copytree(tiny_model, dst)  # copy2 keeps mtimes, so the context id is the same
        for p in [dst.parent, dst, *dst.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


API_TOKENS: dict[str, str] = {}  # service URL → its API token (the user routes)


@pytest.fixture
def service_args() -> tuple[str, ...]:
    """More `pcm serve` flags for a test (parametrize it by this name)."""
    return ()


@pytest.fixture
def pool_service(pool: PoolHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 service_args: tuple[str, ...]) -> Iterator[tuple[ServeProcess, Path, str]]:
    """`pcm serve` with the pool token the glideins get; its API token is generated, and the CLI
    and factory processes the test starts find it through PCM_API_TOKEN_FILE."""
    token_file = pool.dir(tmp_path.name) / "pool.token"
    token = pool.token(token_file)
    s = ServeProcess(tmp_path / "state", "--pool-token-file", str(token_file), "--heartbeat-interval", "1",
                     "--worker-timeout", "20", "--idle-timeout", "600", *service_args,
                     model_roots=[*MODEL_ROOTS, pool.share]).start()  # the model is in the pool's share
    API_TOKENS[s.url] = s.api_token
    monkeypatch.setenv("PCM_API_TOKEN_FILE", str(s.api_token_file))
    yield s, token_file, token
    s.stop()


def api(url: str) -> ServiceClient:
    return ServiceClient(url, token=API_TOKENS[url])


@pytest.fixture
def factory(pool: PoolHandle, pool_service: tuple[ServeProcess, Path, str],
            tmp_path: Path) -> Iterator[Callable[..., FactoryProcess]]:
    made: list[FactoryProcess] = []

    def start(**overrides: Any) -> FactoryProcess:
        serve, token_file, _ = pool_service
        name = f"{tmp_path.name}-{len(made)}"
        log_dir = pool.dir(f"{tmp_path.name}/glideins-{len(made)}")  # the schedd writes as the job owner
        cfg = pool_factory_config(pool, serve.url, name, log_dir, token_file, **overrides)
        fp = FactoryProcess(pool, tmp_path / f"{name}.yaml", name, tmp_path / f"{name}.log", config=cfg)
        fp.write()
        made.append(fp.start())
        return fp

    yield start
    for fp in made:
        fp.stop()


def service_status(url: str) -> ServiceStatus:
    return api(url).request("GET", "/status", response=ServiceStatus)


def submit(url: str, write_workload: Callable[..., Path], model: Path, rows: list[dict[str, str]],
           tag: str) -> SubmitResponse:
    path = write_workload(rows=rows, model=str(model), name=f"{tag}.yaml", sampling=SAMPLING,
                          batch_size=10, output=f"out/{tag}.jsonl")
    return api(url).request("POST", "/workloads", load_workload(path), SubmitResponse)


def workload(url: str, wl_id: str) -> WorkloadStatus:
    return api(url).request("GET", f"/workloads/{wl_id}", response=WorkloadStatus)


def alive_jobs(pool: PoolHandle, fp: FactoryProcess) -> list[Any]:
    return [a for a in pool.jobs(fp.name, ["ClusterId", "ProcId", "JobStatus", "JobRunCount"])
            if a["JobStatus"] in ALIVE]


def gid(ad: Any) -> str:
    return f"{ad['ClusterId']}.{ad['ProcId']}"


def ready_workers(url: str) -> list[Any]:
    return [w for w in service_status(url).workers if w.context_state.value == "ready"]


def check_output(path: Path, rows: list[dict[str, str]], expected: list[str]) -> None:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in rows]  # every row exactly once, in order
    assert [x["error"] for x in lines if x["error"]] == []
    bad = [(x["id"], x["text"], e) for x, e in zip(lines, expected, strict=True) if x["text"] != e]
    assert not bad, bad[:3]


def test_glideins_follow_the_queue_survive_vacate_and_scale_down(
        pool: PoolHandle, pool_service: tuple[ServeProcess, Path, str], factory: Callable[..., FactoryProcess],
        pool_model: Path, write_workload: Callable[..., Path], tmp_path: Path) -> None:
    serve, _, token = pool_service
    url = serve.url
    rows = [{"id": f"c{i:04d}", "claim": f"Claim {i}: the river {i % 97} flows north of town {i % 13}."}
            for i in range(1200)]
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    fp = factory(limits={"min_workers": 0, "max_workers": 3, "per_cycle": 3})

    # 1. a workload makes the factory submit glideins; their workers connect (with the token)
    wl1 = submit(url, write_workload, pool_model, rows[:300], "wl1")
    wait_for(lambda: len(alive_jobs(pool, fp)) == 3, 60, "3 glideins submitted for the workload")
    timings["3 glideins in the queue"] = time.monotonic() - t0
    subprocess.run([sys.executable, "-m", "pcm_service.cli", "factory", "set", "--service", url,
                    "--min", "3"], check=True, capture_output=True)
    wait_for(lambda: workload(url, wl1.workload_id).state.value == "completed", 400, "workload 1 done")
    wait_for(lambda: len(ready_workers(url)) == 3, 300, "3 workers with a ready engine")
    timings["3 engines ready"] = time.monotonic() - t0
    st = service_status(url)
    assert {w.glidein_id for w in st.workers} == {gid(a) for a in alive_jobs(pool, fp)}
    assert all(w.host for w in st.workers)

    # 2. vacating a running glidein costs no row; it restarts and its new worker rejoins
    rows4 = [{"id": f"{r['id']}-{k}", "claim": r["claim"]} for k in range(4) for r in rows]
    wl2 = submit(url, write_workload, pool_model, rows4, "wl2")
    wait_for(lambda: workload(url, wl2.workload_id).rows_done > 0, 60, "workload 2 to start")
    busy = wait_for(lambda: [w for w in service_status(url).workers if w.inflight_batches], 30, "a busy worker")
    victim, victim_worker = busy[0].glidein_id, busy[0].worker_id
    pool.act("Vacate", [victim])
    wait_for(lambda: any(w.glidein_id == victim and w.worker_id != victim_worker
                         for w in service_status(url).workers), 120,
             f"glidein {victim} to restart and register a new worker")
    starts = [a["JobRunCount"] for a in alive_jobs(pool, fp) if gid(a) == victim]
    assert starts and starts[0] >= 2
    timings["vacated glidein rejoined"] = time.monotonic() - t0
    wait_for(lambda: workload(url, wl2.workload_id).state.value == "completed", 600, "workload 2 done")
    timings["workload 2 done"] = time.monotonic() - t0

    # 3. `pcm factory set --max 1` with 3 running: down to 1, no row lost
    wait_for(lambda: len(ready_workers(url)) == 3, 300, "the vacated glidein's engine to be ready again")
    wl3 = submit(url, write_workload, pool_model, rows4, "wl3")
    wait_for(lambda: workload(url, wl3.workload_id).rows_done > 0, 60, "workload 3 to start")
    res = subprocess.run([sys.executable, "-m", "pcm_service.cli", "factory", "set", "--service", url,
                          "--min", "0", "--max", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: len(alive_jobs(pool, fp)) == 1, 120, "the glideins to shrink to 1")
    timings["scaled 3 → 1"] = time.monotonic() - t0
    assert workload(url, wl3.workload_id).state.value == "running", "workload 3 too short for this test"
    wait_for(lambda: workload(url, wl3.workload_id).state.value == "completed", 600, "workload 3 done")
    assert len([w for w in service_status(url).workers]) <= 1

    # 4. the queue drained: the last glidein goes away too
    wait_for(lambda: not pool.jobs(fp.name, ["ClusterId"]), 120, "no glideins left in the queue")
    timings["queue empty"] = time.monotonic() - t0

    # every workload's output equals vLLM's own LLM.generate on the same prompts
    expected = reference_texts(pool_model, [f"Claim: {r['claim']}\nVerdict:" for r in rows],
                               ENGINE, SAMPLING, tmp_path)
    check_output(tmp_path / "out" / "wl1.jsonl", rows[:300], expected[:300])
    check_output(tmp_path / "out" / "wl2.jsonl", rows4, expected * 4)
    check_output(tmp_path / "out" / "wl3.jsonl", rows4, expected * 4)

    # neither token is in a job ad (queue or history), a glidein log, or the service's log
    ads = pool.schedd().history(f'PcmFactory == "{fp.name}"', [])
    assert len(ads) >= 3
    secrets = (token, serve.api_token)
    assert all(t not in str(ad) for ad in ads for t in secrets)
    logs = [*tmp_path.glob("*.log"), *(pool.share / tmp_path.name).glob("glideins-*/*")]
    assert all(t not in p.read_text(errors="replace") for p in logs for t in secrets)
    print("\n[pool test] " + ", ".join(f"{k} at {v:.0f}s" for k, v in timings.items()), file=sys.stderr)


def test_held_glidein_is_reported_and_removed(
        pool: PoolHandle, pool_service: tuple[ServeProcess, Path, str],
        factory: Callable[..., FactoryProcess]) -> None:
    serve, _, token = pool_service
    fp = factory(limits={"min_workers": 1, "max_workers": 1, "per_cycle": 1}, held_timeout=4)
    first = wait_for(lambda: [w for w in service_status(serve.url).workers if w.glidein_id], 90,
                     "a worker in a glidein")[0].glidein_id
    ad = pool.jobs(fp.name, [])[0]
    assert token not in str(ad) and "pool.token" in str(ad.get("TransferInput"))
    pool.act("Hold", [first])

    def held_in_view() -> Any:
        view = api(serve.url).request("GET", "/factory", response=FactoryView)
        return [g for r in view.reports for g in r.glideins if g.glidein_id == first and g.state.value == "held"]

    held = wait_for(held_in_view, 30, f"glidein {first} reported held")
    assert "HoldReasonCode 1" in held[0].detail  # 1 = held by a user (here: the test)
    show = subprocess.run([sys.executable, "-m", "pcm_service.cli", "factory", "show", "--service", serve.url],
                          capture_output=True, text=True)
    assert show.returncode == 0 and "1 held" in show.stdout, show.stdout
    wait_for(lambda: first not in {gid(a) for a in pool.jobs(fp.name, ["ClusterId", "ProcId"])}, 30,
             f"held glidein {first} removed after held_timeout")
    # min 1 still holds: a replacement glidein runs a worker
    wait_for(lambda: [w for w in service_status(serve.url).workers if w.glidein_id not in (None, first)],
             90, "a replacement glidein's worker")
    # the factory re-reads its config file when it changes: new limits, applied without a restart
    fp.write(limits={"min_workers": 0, "max_workers": 0, "per_cycle": 1})
    wait_for(lambda: not pool.jobs(fp.name, ["ClusterId"]), 60, "max 0 from the edited config to empty the queue")
    view = api(serve.url).request("GET", "/factory", response=FactoryView)
    assert view.limits.max_workers == 0 and view.config_limits == view.limits
    assert fp.proc is not None and fp.proc.poll() is None


def test_gpu_request_lands_only_on_a_matching_gpu(
        pool: PoolHandle, pool_service: tuple[ServeProcess, Path, str],
        factory: Callable[..., FactoryProcess]) -> None:
    """The pool simulates one A100 (capability 8.0) and one V100 (7.0)."""
    serve, _, _ = pool_service
    import htcondor2

    startd = htcondor2.Collector().query(htcondor2.AdTypes.Startd, projection=[])[0]
    capability = {startd.eval(a)["Id"]: startd.eval(a)["Capability"]
                  for a in startd.keys() if a.startswith("GPUs_GPU_")}
    assert sorted(capability.values()) == [7.0, 8.0]
    fp = factory(limits={"min_workers": 2, "max_workers": 2, "per_cycle": 2},
                 htcondor={"request_gpus": 1, "gpus_minimum_capability": 8.0})
    wait_for(lambda: len(pool.jobs(fp.name, ["ClusterId"])) == 2, 30, "2 GPU glideins submitted")
    worker = wait_for(lambda: [w for w in service_status(serve.url).workers if w.glidein_id], 90,
                      "a worker in a GPU glidein")[0]
    assert len(worker.gpus) == 1 and capability[worker.gpus[0]] >= 8.0, (worker.gpus, capability)
    # the second glidein stays idle: the negotiator considers it and finds no match (the only
    # other GPU is below the minimum capability)
    rejected = wait_for(lambda: [a for a in pool.jobs(fp.name, ["JobStatus", "LastRejMatchTime"])
                                 if a["JobStatus"] == 1 and a.get("LastRejMatchTime")], 60,
                        "the negotiator to reject the second GPU glidein")
    assert len(rejected) == 1
    assert sorted(a["JobStatus"] for a in pool.jobs(fp.name, ["JobStatus"])) == [1, 2]
    assert len(service_status(serve.url).workers) == 1
    st = subprocess.run([sys.executable, "-m", "pcm_service.cli", "status", "--service", serve.url, "--wide"],
                        capture_output=True, text=True)
    assert worker.gpus[0] in st.stdout and "without a worker" in st.stdout, st.stdout


def vine_connected(url: str) -> Optional[TaskVineStatus]:
    ex = service_status(url).executor
    tv = ex.taskvine if ex is not None else None
    return tv if tv is not None and tv.workers_connected > 0 else None


@pytest.mark.parametrize("service_args", [("--executor", "taskvine", "--vine-port", "0")])
def test_taskvine_glideins_run_vine_workers_that_finish_a_workload_and_leave(
        pool: PoolHandle, pool_service: tuple[ServeProcess, Path, str], factory: Callable[..., FactoryProcess],
        pool_model: Path, write_workload: Callable[..., Path], tmp_path: Path) -> None:
    """`pcm serve --executor taskvine`: the glideins' `pcm worker` runs vine_worker against the
    service's manager (the pool token as its password), the Library runs the batches."""
    serve, _, token = pool_service
    url = serve.url
    rows = [{"id": f"v{i:04d}", "claim": f"Claim {i}: the river {i % 97} flows north of town {i % 13}."}
            for i in range(200)]
    fp = factory(limits={"min_workers": 0, "max_workers": 2, "per_cycle": 2})
    wl = submit(url, write_workload, pool_model, rows, "vine")
    wait_for(lambda: len(alive_jobs(pool, fp)) == 2, 60, "2 glideins submitted for the workload")
    tv = wait_for(lambda: vine_connected(url), 180, "a TaskVine worker connected to the service's manager")
    wait_for(lambda: workload(url, wl.workload_id).state.value == "completed", 600, "the workload done")
    st = service_status(url)
    vine_workers = [w for w in st.workers if w.kind.value == "vine_worker"]
    assert tv is not None and vine_workers and st.executor is not None and st.executor.taskvine is not None
    jobs = {gid(a) for a in pool.schedd().history(f'PcmFactory == "{fp.name}"', ["ClusterId", "ProcId"])} | {
        gid(a) for a in alive_jobs(pool, fp)}
    assert {w.glidein_id for w in vine_workers} <= jobs  # matched to their glideins
    assert sum(w.library_starts for w in vine_workers) <= 2  # one engine per worker
    try:
        wait_for(lambda: not pool.jobs(fp.name, ["ClusterId"]), 180, "no glideins left in the queue")
    except AssertionError:
        print("the service when the glideins did not leave:", service_status(url).model_dump_json(indent=1),
              (tmp_path / f"{fp.name}.log").read_text())
        raise
    expected = reference_texts(pool_model, [f"Claim: {r['claim']}\nVerdict:" for r in rows], ENGINE, SAMPLING,
                               tmp_path)
    check_output(tmp_path / "out" / "vine.jsonl", rows, expected)
    logs = [*(pool.share / tmp_path.name).glob("glideins-*/*")]
    assert any("vine_worker" in p.read_text(errors="replace") for p in logs)
    assert all(token not in p.read_text(errors="replace") for p in logs)


PACKED_ENV = Path(tempfile.gettempdir()) / "pcm-test-packed-env" / "pcm-env.tar.gz"
# dev tools are not part of a worker; triton neither on CPU (vLLM's CPU build runs without it)
NOT_IN_WORKER_ENV = ("triton*", "mypy*", "*__mypyc*", "hypothesis*", "schemathesis*", "ruff*", "grimp*",
                     "import_linter*")


@pytest.fixture(scope="session")
def packed_env() -> Path:
    """`pcm env pack` of this checkout's venv (once per session)."""
    PACKED_ENV.parent.mkdir(parents=True, exist_ok=True)
    excludes = [a for p in NOT_IN_WORKER_ENV for a in ("--exclude", p)]
    subprocess.run([sys.executable, "-m", "pcm_service.cli", "env", "pack", "-o", str(PACKED_ENV), *excludes],
                   check=True, timeout=900)
    return PACKED_ENV


@pytest.mark.parametrize("service_args", [("--worker-env", str(PACKED_ENV))])
def test_bare_glideins_bootstrap_the_environment_from_the_service_then_from_each_other(
        packed_env: Path, pool: PoolHandle, pool_service: tuple[ServeProcess, Path, str],
        factory: Callable[..., FactoryProcess], pool_model: Path, write_workload: Callable[..., Path],
        tmp_path: Path) -> None:
    """Glideins on nodes with no PCM environment (neither this checkout with its venv nor the
    interpreter's prefix is mounted in the pool during this test) and another python3 (the pool's
    Debian trixie 3.13): the first fetches the packed environment from the service, the second
    from the first; both run the worker from it, and the rows equal LLM.generate's."""
    serve, _, token = pool_service
    payload = pool.share / tmp_path.name / "payload"  # what the schedd reads: entry.sh and bootstrap.py
    payload.mkdir()
    for f in ("entry.sh", "bootstrap.py"):
        shutil.copy2(REPO / "worker_image" / f, payload / f)
    hide = sorted({str(REPO), sys.base_prefix})
    with pool.hidden(hide):
        bare_glideins_run(pool, serve, token, factory, pool_model, write_workload, tmp_path, payload)


def bare_glideins_run(pool: PoolHandle, serve: ServeProcess, token: str, factory: Callable[..., FactoryProcess],
                      pool_model: Path, write_workload: Callable[..., Path], tmp_path: Path, payload: Path) -> None:
    url = serve.url
    factory(limits={"min_workers": 0, "max_workers": 1, "per_cycle": 1},
            htcondor={"executable": str(payload / "entry.sh"), "bootstrap": str(payload / "bootstrap.py"),
                      "environment": {"PCM_ENV": "packed"}})
    as_worker = ServiceClient(url, token=token)
    digest = as_worker.request("GET", "/environment")["digest"]
    env_chunks = set(as_worker.request("GET", f"/models/{digest}", response=ModelManifest).chunk_lengths)
    rows = [{"id": f"e{i:04d}", "claim": f"Claim {i}: the river {i % 97} flows north of town {i % 13}."}
            for i in range(120)]

    # wave 1: nobody holds the environment: it comes from the service (the origin)
    wl1 = submit(url, write_workload, pool_model, rows[:60], "env1")
    wait_for(lambda: workload(url, wl1.workload_id).state.value == "completed", 600, "workload 1 done")
    first = service_status(url).workers
    assert len(first) == 1
    env_transfers = transfers_of(serve, env_chunks)
    assert env_transfers and all(r["source"] == ORIGIN for r in env_transfers)
    wave1 = len(env_transfers)

    # wave 2: one more glidein while the first one's worker is alive: the environment from it
    subprocess.run([sys.executable, "-m", "pcm_service.cli", "factory", "set", "--service", url,
                    "--min", "2", "--max", "2"], check=True, capture_output=True)
    second = wait_for(lambda: [w for w in service_status(url).workers if w.worker_id != first[0].worker_id],
                      600, "a second glidein's worker to register")
    wl2 = submit(url, write_workload, pool_model, rows[60:], "env2")
    wait_for(lambda: workload(url, wl2.workload_id).state.value == "completed", 600, "workload 2 done")
    later = [r for r in transfers_of(serve, env_chunks)[wave1:] if r["ok"]]
    assert {r["chunk"] for r in later} == env_chunks, "the second glidein fetched the whole environment"
    assert all(r["source"] == first[0].worker_id for r in later), \
        f"none from the origin while a peer holds it: {Counter(r['source'] for r in later)}"

    # both workers ran from the packed environment; what they wrote equals vLLM's own
    with db(serve.state_dir) as conn:
        envs = {r[0]: r[1] for r in conn.execute("SELECT worker_id, environment FROM workers")}
    assert envs[first[0].worker_id] == digest and envs[second[0].worker_id] == digest
    expected = reference_texts(pool_model, [f"Claim: {r['claim']}\nVerdict:" for r in rows], ENGINE, SAMPLING,
                               tmp_path)
    check_output(tmp_path / "out" / "env1.jsonl", rows[:60], expected[:60])
    check_output(tmp_path / "out" / "env2.jsonl", rows[60:], expected[60:])
    logs = "".join(p.read_text(errors="replace") for p in (pool.share / tmp_path.name).glob("glideins-*/*.err"))
    assert "pcm-bootstrap: unpacked" in logs and "pcm-bootstrap: fetching environment" in logs
    assert token not in logs


def transfers_of(serve: ServeProcess, chunks: set[str]) -> list[Any]:
    with db(serve.state_dir) as conn:
        rows = conn.execute("SELECT worker_id, source, chunk, ok FROM transfers ORDER BY transfer_id").fetchall()
    return [r for r in rows if r["chunk"] in chunks]
