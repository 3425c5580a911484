"""factory.yaml: bad configs fail clearly; limits from the file vs. `pcm factory set`; the pool token."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from factory.backends.local import LocalBackend
from factory.config import FactoryConfig, load_factory_config
from factory.daemon import Factory
from pcm_service.protocol import FactoryLimits
from tests.support.serve import ServeProcess


def factory_run(cfg: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcm_service.cli", "factory", "run", "--config", str(cfg),
                           *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env},
                          cwd=cwd)


def token_file(path: Path, value: str = "t0ken-for-tests") -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "factory.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("backend: htcondor\nhtcondor: {request_gpu: 1}\n", "htcondor.request_gpu: unknown field"),
    ("limits: {min_workers: 3, max_workers: 1}\n", "max_workers (1) is below min_workers (3)"),
    ("interval: 0\n", "interval: Input should be greater than 0"),
    ("backend: slurm\n", "backend: Input should be 'htcondor' or 'local'"),
    ("htcondor: {environment: {PCM_TOKEN: abc}}\n", "give secrets as token_file"),
    ("backend: htcondor\nhtcondor: {token_file: nowhere.token}\n", "htcondor.token_file"),
    ("backend: htcondor\n", "htcondor.token_file: required"),
    ("local: {token_file: nowhere.token}\n", "local.token_file"),
    ("limits: [1, 2\n", "not valid YAML"),
    ("ca_file: nowhere.pem\n", "ca_file: "),
])
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    res = factory_run(write(tmp_path, text))
    assert res.returncode == 2, res.stderr
    assert message in " ".join(res.stderr.split()), res.stderr


def test_unreachable_schedd_is_a_clear_error(tmp_path: Path) -> None:
    token_file(tmp_path / "pool.token")
    cfg = write(tmp_path, "backend: htcondor\nhtcondor: {collector: '127.0.0.1:9', schedd: nosuch,"
                          " token_file: pool.token}\n")
    res = factory_run(cfg, CONDOR_CONFIG="ONLY_ENV", _CONDOR_TOOL_TIMEOUT_MULTIPLIER="1")
    assert res.returncode == 1, res.stderr
    err = " ".join(res.stderr.split())
    assert "cannot reach schedd 'nosuch' via collector 127.0.0.1:9" in err, err
    assert "htcondor.collector" in err


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    token_file(tmp_path / "pool.token")
    cfg = load_factory_config(write(tmp_path, "backend: htcondor\nhtcondor: {token_file: pool.token,"
                                              " log_dir: logs}\nlocal: {token_file: pool.token}\n"))
    assert cfg.htcondor.token_file == str(tmp_path / "pool.token")
    assert cfg.htcondor.log_dir == str(tmp_path / "logs")
    assert cfg.local.token_file == str(tmp_path / "pool.token")


def test_file_limits_apply_once_and_set_survives_restarts(tmp_path: Path) -> None:
    """The file's limits are applied when they change; `pcm factory set` made later survives a
    restart of the service and of a factory started again with the same file."""
    serve = ServeProcess(tmp_path / "state").start()
    cfg_path = write(tmp_path, yaml.safe_dump({"service": serve.url,
                                               "limits": {"min_workers": 1, "max_workers": 4}}))
    client = serve.client()

    def factory() -> Factory:
        cfg = load_factory_config(cfg_path)
        return Factory(client, LocalBackend(serve.url, tmp_path / "g"), cfg, config_path=cfg_path)

    try:
        assert factory().apply_config_limits() == FactoryLimits(min_workers=1, max_workers=4)
        res = subprocess.run([sys.executable, "-m", "pcm_service.cli", "factory", "set", "--service",
                              serve.url, "--max", "2"], capture_output=True, text=True,
                             env={**os.environ, "PCM_API_TOKEN_FILE": str(serve.api_token_file)})
        assert res.returncode == 0, res.stderr
        serve.stop()
        serve.start()
        assert factory().apply_config_limits() is None  # same file: the later `set` stands
        assert client.request("GET", "/factory/limits", response=FactoryLimits).max_workers == 2
        fac = factory()
        cfg_path.write_text(yaml.safe_dump({"service": serve.url, "limits": {"min_workers": 0,
                                                                             "max_workers": 7}}))
        assert fac.reload_if_changed()  # an edited file is a new setting
        assert client.request("GET", "/factory/limits", response=FactoryLimits).max_workers == 7
        cfg_path.write_text("interval: -1\n")
        assert not fac.reload_if_changed() and fac.config.interval == FactoryConfig().interval
    finally:
        serve.stop()


def test_pool_token_file_option_replaces_the_generated_one(tmp_path: Path) -> None:
    token = token_file(tmp_path / "pool.token", "s3cret-pool-token")
    serve = ServeProcess(tmp_path / "state", "--pool-token-file", str(token)).start()
    reg = {"host": "h", "pid": 1}
    try:
        r = httpx.post(f"{serve.url}/v1/pcm/workers", json=reg)
        assert r.status_code == 401 and "missing pool token" in r.text
        r = httpx.post(f"{serve.url}/v1/pcm/workers", json=reg, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403
        r = httpx.post(f"{serve.url}/v1/pcm/workers", json=reg,
                       headers={"Authorization": "Bearer s3cret-pool-token"})
        assert r.status_code == 201
        assert not serve.pool_token_file.exists()  # given a file, none is generated
        assert httpx.get(f"{serve.url}/v1/pcm/status").status_code == 401  # the user API needs its token
    finally:
        serve.stop()
    assert "s3cret-pool-token" not in serve.log_path.read_text()


def test_local_backend_without_a_pool_token_exits_2_saying_what_to_set(tmp_path: Path) -> None:
    res = factory_run(write(tmp_path, "backend: local\n"), cwd=tmp_path)  # no ./pcm-state here
    assert res.returncode == 2, res.stderr
    err = " ".join(res.stderr.split())
    assert "local.token_file: no pool token" in err and "PCM_POOL_TOKEN_FILE" in err, err


def test_local_backend_finds_the_pool_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from factory.config import resolve_pool_token_file

    (tmp_path / "pcm-state").mkdir()
    here = token_file(tmp_path / "pcm-state" / "pool.token")
    monkeypatch.chdir(tmp_path)
    assert resolve_pool_token_file(FactoryConfig()).local.token_file == str(here)  # ./pcm-state
    other = token_file(tmp_path / "other.token")
    monkeypatch.setenv("PCM_POOL_TOKEN_FILE", str(other))
    assert resolve_pool_token_file(FactoryConfig()).local.token_file == str(other)  # the environment
    cfg = FactoryConfig.model_validate({"local": {"token_file": str(here)}})
    assert resolve_pool_token_file(cfg).local.token_file == str(here)  # the config file wins


def test_local_backend_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    tok = token_file(tmp_path / "pool.token")
    tok.chmod(0o644)
    res = factory_run(write(tmp_path, "backend: local\nlocal: {token_file: pool.token}\n"))
    assert res.returncode == 2, res.stderr
    assert f"chmod 600 {tok}" in " ".join(res.stderr.split()), res.stderr


def test_worker_with_unreadable_token_file_exits_2(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pcm_service.cli", "worker", "--service", "http://127.0.0.1:9",
                          "--token-file", str(tmp_path / "missing.token")], capture_output=True, text=True)
    assert res.returncode == 2 and "--token-file: cannot read the token file" in res.stderr


@pytest.mark.parametrize("name", ["factory-gpu-pool.yaml", "factory-testpool.yaml"])
def test_example_configs_make_valid_glidein_descriptions(name: str) -> None:
    """The shipped examples parse, and the bindings accept the glidein they describe."""
    htcondor2 = pytest.importorskip("htcondor2")
    from factory.backends.htcondor import glidein_description
    from pcm_service.yamlmodel import parse_yaml_model

    repo = Path(__file__).resolve().parent.parent
    cfg = parse_yaml_model((repo / "configs" / name).read_text(), FactoryConfig, name)
    sub = htcondor2.Submit(glidein_description(cfg.htcondor, cfg.service, cfg.name))
    text = str(sub)
    assert f'MY.PcmFactory = "{cfg.name}"' in text and "--glidein-id $(ClusterId).$(ProcId)" in text
    assert "--token-file pool.token" in text and sub["transfer_input_files"].endswith("pool.token")
    if name == "factory-gpu-pool.yaml":
        assert (sub["request_gpus"], sub["gpus_minimum_capability"]) == ("1", "8.0")
        assert sub["MY.IsOpportunistic"] == "true" and sub["accounting_group"] == "group_opportunistic.pcm"


def test_glideins_get_the_ca_file_transferred_like_the_token(tmp_path: Path) -> None:
    htcondor2 = pytest.importorskip("htcondor2")
    from factory.backends.htcondor import glidein_description

    token_file(tmp_path / "pool.token")
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_factory_config(write(tmp_path, "backend: htcondor\nservice: https://submit.example:8642\n"
                                              "ca_file: tls/ca.pem\nhtcondor: {token_file: pool.token}\n"))
    assert cfg.ca_file == str(tmp_path / "tls" / "ca.pem")  # relative to the config file
    sub = htcondor2.Submit(glidein_description(cfg.htcondor, cfg.service, cfg.name, cfg.ca_file))
    assert sub["transfer_input_files"] == f"{tmp_path / 'pool.token'},{tmp_path / 'tls' / 'ca.pem'}"
    assert "--token-file pool.token --ca-file ca.pem" in sub["arguments"]  # names in the sandbox
    (tmp_path / "tls" / "pool.token").write_text("x")
    res = factory_run(write(tmp_path, "backend: htcondor\nca_file: tls/pool.token\n"
                                      "htcondor: {token_file: pool.token}\n"))
    assert res.returncode == 2 and "same file name" in " ".join(res.stderr.split()), res.stderr
