"""TaskVine as built by `make taskvine`: a real Manager, real `vine_worker` processes, a
Library whose context function runs once per library over many FunctionCalls, and the pool
password as TaskVine's password file (a worker without it is refused). Under CI
(PCM_REQUIRE_TASKVINE=1) a missing build fails instead of skipping."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.support import REPO
from tests.support.taskvine import require_taskvine, stop_vine_worker

if TYPE_CHECKING:
    from ndcctools.taskvine import Manager

VENV_BIN = Path(sys.executable).parent
vine = require_taskvine()


def start_worker(port: int, password: Path | None, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    args = ["--password", str(password)] if password else []
    return subprocess.Popen([str(VENV_BIN / "vine_worker"), *args, "--cores", "2", "--memory", "2000",
                             "--disk", "2000", "--timeout", "60", "127.0.0.1", str(port)],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[Manager, Path]]:
    password = tmp_path / "pool.token"
    password.write_text("a-pool-token-for-taskvine")
    password.chmod(0o600)
    m = vine.Manager(port=0, run_info_path=str(tmp_path / "vine-run-info"))
    m.set_password_file(str(password))
    m.tune("watch-library-logfiles", 1)
    yield m, password


def test_a_library_loads_its_context_once_for_many_calls(manager: tuple[Manager, Path], tmp_path: Path) -> None:
    from tests.support import vine_functions

    m, password = manager
    lib = m.create_library_from_functions("ctx-lib", vine_functions.double, add_env=False, exec_mode="direct",
                                          library_context_info=[vine_functions.load_context, ["ctx-1"], {}])
    lib.set_cores(1)
    m.install_library(lib)
    worker = start_worker(m.port, password, tmp_path / "worker.log")
    try:
        for i in range(20):
            m.submit(vine.FunctionCall("ctx-lib", "double", i))
        outputs = []
        while not m.empty():
            t = m.wait(30)
            assert t is not None, (tmp_path / "worker.log").read_text()[-2000:]
            assert t.successful(), t.result
            outputs.append(t.output)
    finally:
        stop_vine_worker(worker)
    assert sorted(o["y"] for o in outputs) == [2 * i for i in range(20)]
    assert {o["tag"] for o in outputs} == {"ctx-1"} and {o["loads"] for o in outputs} == {1}
    assert 1 <= len({o["pid"] for o in outputs}) <= 2  # at most one library per core, each loaded once


def test_a_worker_without_the_password_is_refused(manager: tuple[Manager, Path], tmp_path: Path) -> None:
    m, _ = manager
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    worker = start_worker(m.port, wrong, tmp_path / "worker.log")
    try:
        m.submit(vine.PythonTask(sum, [1, 2]))
        assert m.wait(8) is None  # no worker ever joined to run it
        assert m.stats.workers_joined == 0
    finally:
        stop_vine_worker(worker)


def test_with_a_certificate_workers_connect_over_ssl_and_plain_ones_are_refused(tmp_path: Path) -> None:
    """What `pcm serve --executor taskvine --tls-cert --tls-key` sets up: the manager on SSL with
    the service's certificate, and the glidein's `vine_worker --ssl` (ExecutorInfo.ssl)."""
    from pcm_service.protocol import ExecutorInfo, ExecutorKind, Resources
    from worker_image.vine_worker import vine_worker_argv

    made = subprocess.run([sys.executable, "-m", "pcm_service.cli", "tls", "init", str(tmp_path / "tls")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    password = tmp_path / "pool.token"
    password.write_text("a-pool-token-for-taskvine")
    m = vine.Manager(port=0, ssl=(str(tmp_path / "tls" / "server.key"), str(tmp_path / "tls" / "server.pem")),
                     run_info_path=str(tmp_path / "vine-run-info"))
    m.set_password_file(str(password))
    plain = start_worker(m.port, password, tmp_path / "plain.log")
    try:
        m.submit(vine.PythonTask(sum, [1, 2]))
        assert m.wait(8) is None and m.stats.workers_joined == 0  # no SSL: never joins
    finally:
        stop_vine_worker(plain)
    info = ExecutorInfo(kind=ExecutorKind.TASKVINE, port=m.port, ssl=True)
    argv = vine_worker_argv(str(VENV_BIN / "vine_worker"), "https://127.0.0.1:1", info, password,
                            Resources(cpus=1, memory_mb=1000), tmp_path / "glidein", None)
    assert "--ssl" in argv
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    worker = subprocess.Popen([*argv[:1], "--timeout", "60", *argv[1:]], env=env,
                              stdout=(tmp_path / "ssl.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        t = m.wait(60)
        assert t is not None, (tmp_path / "ssl.log").read_text()[-2000:]
        assert t.successful() and t.output == 3 and m.stats.workers_joined == 1
    finally:
        stop_vine_worker(worker)


def test_a_library_asks_for_the_engines_gpus_and_the_weights_memory_only_on_a_gpu_pool(tmp_path: Path) -> None:
    from pcm_service.executors.taskvine import library_resources
    from pcm_service.protocol import ContextSpec, EngineSettings

    (tmp_path / "model.safetensors").write_bytes(b"\0" * (3 * 2**20))
    spec = ContextSpec(model=str(tmp_path), engine=EngineSettings(tensor_parallel_size=2))
    assert library_resources(spec, gpu_pool=False) == {}  # CPU: the whole worker
    assert library_resources(spec, gpu_pool=True) == {"gpus": 2, "memory": 4}
