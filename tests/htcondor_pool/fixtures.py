"""The real HTCondor test pool (tests/htcondor_pool/testpool.sh) and a factory daemon against it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPT = REPO / "tests" / "htcondor_pool" / "testpool.sh"
POOL_UID = 2000  # the job owner inside the pool (testpool.sh POOL_UID)


@dataclass
class PoolHandle:
    env: dict[str, str]
    share: Path
    root: Path
    _schedd: Any = None

    def schedd(self) -> Any:
        if self._schedd is None:
            import htcondor2

            htcondor2.reload_config()
            self._schedd = htcondor2.Schedd(
                htcondor2.Collector().locate(htcondor2.DaemonType.Schedd))
        return self._schedd

    def jobs(self, factory: str, projection: Optional[list[str]] = None) -> list[Any]:
        return self.schedd().query(f'PcmFactory == "{factory}"', projection or [])

    def act(self, action: str, job_ids: list[str]) -> None:
        import htcondor2

        self.schedd().act(getattr(htcondor2.JobAction, action), job_ids, reason="PCM test")

    def dir(self, name: str) -> Path:
        """A fresh directory every job can see (and the job owner can write)."""
        d = self.share / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        d.chmod(0o1777)
        return d

    @contextmanager
    def hidden(self, paths: list[str]) -> Iterator[None]:
        """Nodes without these host directories (bind-mounted into the pool for the other
        tests' glideins): unmounted inside the pool for the block, mounted again after it."""
        inside = [self.root / p.lstrip("/") for p in paths]
        for d in inside:
            subprocess.run(["umount", "-l", str(d)], check=True, capture_output=True)  # -l: even if busy
        try:
            yield
        finally:
            for src, d in zip(paths, inside, strict=True):
                subprocess.run(["mount", "--bind", src, str(d)], check=True, capture_output=True)
                subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True, capture_output=True)

    def token(self, path: Path, owner: int = POOL_UID) -> str:
        tok = os.urandom(24).hex()
        path.write_text(tok + "\n")
        path.chmod(0o600)
        os.chown(path, owner, owner)
        return tok


@pytest.fixture(scope="session")
def pool() -> Iterator[PoolHandle]:
    require = os.environ.get("PCM_REQUIRE_POOL") == "1"  # CI: a pool that cannot start fails
    give_up = pytest.fail if require else pytest.skip
    if os.geteuid() != 0:
        give_up("HTCondor test pool not started: tests/htcondor_pool/testpool.sh needs root (chroot, mounts)")
    env = dict(os.environ, POOL_BIND_RO=f"{REPO} {sys.base_prefix}")
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0:
        give_up(f"HTCondor test pool could not start (tests/htcondor_pool/testpool.sh start, exit"
                f" {res.returncode}):\n{res.stderr[-2000:]}")
    print(f"\n[pool] started in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    state = Path(os.environ.get("POOL_STATE", "/tmp/pcm-testpool/state"))
    pool_env = {}
    for line in (state / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            k, _, v = line[7:].partition("=")
            pool_env[k] = v
    saved = {k: os.environ.get(k) for k in pool_env}
    os.environ.update(pool_env)  # htcondor2 in this process talks to the pool too
    try:
        yield PoolHandle(env=pool_env, share=Path(pool_env["PCM_TEST_POOL_SHARE"]),
                       root=Path(pool_env["PCM_TEST_POOL_ROOT"]))
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
        if os.environ.get("PCM_KEEP_POOL") != "1":  # keep it running between local test runs
            subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=300)


@dataclass
class FactoryProcess:
    """A real `pcm factory run --config` process against the test pool."""
    pool: PoolHandle
    config_path: Path
    name: str
    log: Path
    proc: Optional[subprocess.Popen[bytes]] = None
    config: dict[str, Any] = field(default_factory=dict)

    def write(self, **changes: Any) -> None:
        for k, v in changes.items():
            if isinstance(v, dict) and isinstance(self.config.get(k), dict):
                self.config[k].update(v)
            else:
                self.config[k] = v
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config))
        tmp.replace(self.config_path)

    def start(self) -> "FactoryProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pcm_service.cli", "factory", "run", "--config", str(self.config_path)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=os.environ.copy())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        ids = [f"{a['ClusterId']}.{a['ProcId']}" for a in self.pool.jobs(self.name, ["ClusterId", "ProcId"])]
        if ids:
            self.pool.act("Remove", ids)


def pool_factory_config(pool: PoolHandle, service_url: str, name: str, log_dir: Path,
                    token_file: Path, **overrides: Any) -> dict[str, Any]:
    """configs/factory-testpool.yaml with this checkout's paths and the test's settings."""
    cfg = yaml.safe_load((REPO / "configs" / "factory-testpool.yaml").read_text())
    cfg.update(service=service_url, name=name)
    cfg["htcondor"].update(log_dir=str(log_dir), token_file=str(token_file),
                           executable=str(REPO / "worker_image" / "entry.sh"),
                           environment={"PCM_VENV": str(Path(sys.prefix))})
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg
