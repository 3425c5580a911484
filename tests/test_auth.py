"""Mandatory access control against a real `pcm serve`: the pool token for worker routes, the
API token for user routes, generated 0600 on first start; tokens in no log, status or argv."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from fastapi.routing import APIRoute
from typer.testing import CliRunner

from factory.backends.local import LocalBackend
from pcm_service.api import create_app
from pcm_service.cli import app
from pcm_service.core import ServiceCore
from pcm_service.protocol import FactoryReport
from pcm_service.tokens import API, TokenError, client_token, create_token_file, read_token
from tests.support.serve import ServeProcess
from tests.support.waiting import wait_for
from tests.support.workloads import WriteWorkload

runner = CliRunner()
# the routes without a token and what they answer without one: the status page holds no data
# (its data route takes a token or the page's session cookie); a login without a token is 422
OPEN = {("GET", "/healthz"): 200, ("GET", "/"): 200, ("POST", "/ui/login"): 422, ("POST", "/ui/logout"): 204}
POOL_ROUTES = {("GET", "/v1/pcm/blobs/{chunk}"), ("GET", "/v1/pcm/models/{digest}"),
               ("GET", "/v1/pcm/executor"), ("GET", "/v1/pcm/environment"),
               ("POST", "/v1/pcm/bootstrap/{receiver}/fetch"),
               ("DELETE", "/v1/pcm/bootstrap/{receiver}"), ("POST", "/v1/pcm/workers")}


def expected_kind(method: str, path: str) -> str:
    if (method, path) in OPEN:
        return "open"
    if path.startswith("/v1/pcm/workers/{worker_id}"):
        return "worker"  # that worker's own credential
    return "pool" if (method, path) in POOL_ROUTES else "api"


def every_route(tmp_path: Path) -> list[tuple[str, str]]:
    """Every (method, path template) create_app serves: a route added later is checked too."""
    core = ServiceCore(tmp_path / "routes-state")
    try:
        routes = [r for r in create_app(core, "p", "a").routes if isinstance(r, APIRoute)]
    finally:
        core.close()
    return sorted((m, r.path) for r in routes for m in r.methods)


def concrete(path: str, worker_id: str = "w-nobody") -> str:
    return (path.replace("{chunk}", "0" * 64).replace("{digest}", "f" * 64)
            .replace("{worker_id}", worker_id).replace("{workload_id}", "wl-nobody")
            .replace("{receiver}", "boot-nobody"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_route_refuses_a_missing_wrong_or_other_token(serve: ServeProcess, tmp_path: Path) -> None:
    routes = every_route(tmp_path)
    assert len(routes) >= 20 and ("POST", "/v1/pcm/workers") in routes
    me = httpx.post(f"{serve.url}/v1/pcm/workers", json={"host": "h", "pid": 1}, headers=bearer(serve.pool_token))
    other_worker = httpx.post(f"{serve.url}/v1/pcm/workers", json={"host": "h", "pid": 2},
                              headers=bearer(serve.pool_token)).json()["worker_token"]
    tokens = {"pool": serve.pool_token, "api": serve.api_token, "worker": me.json()["worker_token"]}
    others = {"pool": serve.api_token, "api": serve.pool_token, "worker": other_worker}
    seen = []
    with httpx.Client(base_url=serve.url, timeout=30) as http:
        for method, path in routes:
            url, kind = concrete(path, me.json()["worker_id"]), expected_kind(method, path)

            def call(headers: dict[str, str], method: str = method, url: str = url) -> int:
                return http.request(method, url, headers=headers).status_code

            if kind == "open":
                assert call({}) == OPEN[(method, path)], (method, path)
                continue
            got = (call({}), call(bearer("not-the-token")), call(bearer(others[kind])),
                   call({"Authorization": f"Basic {tokens[kind]}"}), call(bearer(tokens[kind])))
            seen.append((method, path, kind, got))
            assert got[:4] == (401, 403, 403, 401), (method, path, kind, got)
            assert got[4] not in (401, 403), (method, path, kind, got)
            if kind == "worker":  # nor the pool token, nor the API token
                assert (call(bearer(serve.pool_token)), call(bearer(serve.api_token))) == (403, 403)
    assert {k for *_, k, _ in seen} == {"pool", "api", "worker"}


def test_generated_token_files_are_0600_distinct_and_reused_after_a_restart(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path / "state").start()
    try:
        first = {f: f.read_text() for f in (serve.api_token_file, serve.pool_token_file)}
        for f in first:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert serve.api_token != serve.pool_token and len(serve.api_token) >= 40
        serve.stop()
        serve.start()
        assert {f: f.read_text() for f in first} == first
        assert httpx.get(f"{serve.url}/v1/pcm/status", headers=bearer(serve.api_token)).status_code == 200
    finally:
        serve.stop()
    log = serve.log_path.read_text()
    assert str(serve.api_token_file.resolve()) in log and "PCM_API_TOKEN_FILE" in log
    assert serve.api_token not in log and serve.pool_token not in log


def test_create_token_file_is_never_open_to_others(tmp_path: Path) -> None:
    old = os.umask(0)  # even with nothing masked the file is born 0600
    try:
        token = create_token_file(tmp_path / "d" / "t.token")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d" / "t.token").stat().st_mode) == 0o600
    assert read_token(tmp_path / "d" / "t.token") == token
    with pytest.raises(FileExistsError):
        create_token_file(tmp_path / "d" / "t.token")


@pytest.mark.parametrize("which", ["state-dir", "option"])
def test_a_token_file_others_can_read_is_refused(tmp_path: Path, which: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    bad = state / "pool.token" if which == "state-dir" else tmp_path / "api.token"
    bad.write_text("some-token\n")
    bad.chmod(0o640)
    args = ["--api-token-file", str(bad)] if which == "option" else []
    res = subprocess.run([sys.executable, "-m", "pcm_service.cli", "serve", "--state-dir", str(state),
                          "--port", "9", *args], capture_output=True, text=True, timeout=60)
    err = " ".join(res.stderr.split())
    assert res.returncode == 2 and f"chmod 600 {bad}" in err and "some-token" not in err, err


def test_tokens_from_environment_and_options(tmp_path: Path) -> None:
    pool_file = tmp_path / "my-pool.token"
    pool_file.write_text("pool-from-a-file\n")
    pool_file.chmod(0o600)
    serve = ServeProcess(tmp_path / "state", env={"PCM_API_TOKEN": "api-from-env",
                                                  "PCM_POOL_TOKEN_FILE": str(pool_file)}).start()
    try:
        assert not serve.api_token_file.exists() and not serve.pool_token_file.exists()
        assert httpx.get(f"{serve.url}/v1/pcm/status", headers=bearer("api-from-env")).status_code == 200
        reg = {"host": "h", "pid": 1}
        r = httpx.post(f"{serve.url}/v1/pcm/workers", json=reg, headers=bearer("pool-from-a-file"))
        assert r.status_code == 201
    finally:
        serve.stop()
    log = serve.log_path.read_text()
    assert "$PCM_API_TOKEN" in log and "api-from-env" not in log and "pool-from-a-file" not in log


def test_client_token_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def tok(name: str, value: str) -> Path:
        (tmp_path / name).write_text(value)
        (tmp_path / name).chmod(0o600)
        return tmp_path / name

    default_dir = tmp_path / "pcm-state"
    default_dir.mkdir()
    assert client_token(API, None, default_dir) is None
    tok("pcm-state/api.token", "from-default-dir")
    assert client_token(API, None, default_dir).value == "from-default-dir"  # type: ignore[union-attr]
    monkeypatch.setenv("PCM_API_TOKEN", "from-env-value")
    assert client_token(API, None, default_dir).source == "$PCM_API_TOKEN"  # type: ignore[union-attr]
    monkeypatch.setenv("PCM_API_TOKEN_FILE", str(tok("env-file", "from-env-file")))
    assert client_token(API, None, default_dir).value == "from-env-file"  # type: ignore[union-attr]
    assert client_token(API, tok("option", "from-option"), default_dir).value == "from-option"  # type: ignore[union-attr]
    assert "from-option" not in repr(client_token(API, tmp_path / "option"))
    (tmp_path / "option").chmod(0o604)
    with pytest.raises(TokenError, match="chmod 600"):
        client_token(API, tmp_path / "option")


@pytest.fixture
def in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory without ./pcm-state, so no token is found by default."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    monkeypatch.chdir(d)
    yield d


def test_cli_without_or_with_a_wrong_token_says_what_to_do_and_changes_nothing(
        serve: ServeProcess, write_workload: WriteWorkload, in_empty_dir: Path) -> None:
    wl = str(write_workload())
    s = ["--service", serve.url]
    for cmd in (["submit", wl, *s], ["status", *s], ["factory", "set", *s, "--max", "9"], ["factory", "show", *s]):
        r = runner.invoke(app, cmd)
        out = " ".join(r.output.split())
        assert r.exit_code != 0, (cmd, r.output)
        assert "wants its API token: pass --token-file STATE_DIR/api.token" in out, (cmd, out)
        assert "PCM_API_TOKEN_FILE" in out, out
        wrong = runner.invoke(app, [*cmd, "--token-file", str(serve.pool_token_file)])
        out = " ".join(wrong.output.split())
        assert wrong.exit_code != 0 and f"refused the API token from {serve.pool_token_file}" in out, out
        assert serve.pool_token not in out
    st = serve.client().request("GET", "/status")
    assert st["workloads"] == [] and serve.client().request("GET", "/factory/limits")["max_workers"] != 9


def test_cli_finds_the_token_in_env_or_in_pcm_state_here(tmp_path: Path, write_workload: WriteWorkload,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    serve = ServeProcess(tmp_path / "pcm-state").start()  # `pcm serve`'s default state dir name
    try:
        monkeypatch.chdir(tmp_path)
        r = runner.invoke(app, ["factory", "set", "--service", serve.url, "--max", "3"])
        assert r.exit_code == 0, r.output
        monkeypatch.chdir(tmp_path / "pcm-state")  # no ./pcm-state here: the environment gives it
        monkeypatch.setenv("PCM_API_TOKEN", serve.api_token)
        r = runner.invoke(app, ["submit", str(write_workload()), "--service", serve.url])
        assert r.exit_code == 0, r.output
        monkeypatch.delenv("PCM_API_TOKEN")
        monkeypatch.setenv("PCM_API_TOKEN_FILE", str(serve.api_token_file))
        r = runner.invoke(app, ["factory", "show", "--service", serve.url])
        assert r.exit_code == 0 and "min 0, max 3" in r.output, r.output
    finally:
        serve.stop()


def test_status_views_and_logs_never_show_a_token(serve: ServeProcess, write_workload: WriteWorkload) -> None:
    r = httpx.post(f"{serve.url}/v1/pcm/workers", json={"host": "h", "pid": 1, "glidein_id": "1.0"},
                   headers=bearer(serve.pool_token))
    assert r.status_code == 201
    serve.client().request("POST", "/factory/report", FactoryReport(factory="f", backend="local", at=1.0))
    env = {**os.environ, "PCM_API_TOKEN_FILE": str(serve.api_token_file)}
    assert runner.invoke(app, ["submit", str(write_workload()), "--service", serve.url], env=env).exit_code == 0
    outputs = [runner.invoke(app, cmd, env=env).output for cmd in (
        ["status", "--service", serve.url, "--json", "--all"], ["status", "--service", serve.url],
        ["factory", "show", "--service", serve.url], ["factory", "show", "--service", serve.url, "--json"])]
    assert '"workload_id"' in outputs[0] and '"glidein_id": "1.0"' in outputs[0]
    worker_token = r.json()["worker_token"]
    for text in [*outputs, serve.log_path.read_text()]:
        assert serve.api_token not in text and serve.pool_token not in text and worker_token not in text


def test_local_glideins_get_the_pool_token_as_a_file_and_no_token_values(
        serve: ServeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCM_POOL_TOKEN", serve.pool_token)  # values in the factory's environment...
    monkeypatch.setenv("PCM_API_TOKEN", serve.api_token)
    backend = LocalBackend(serve.url, tmp_path / "glideins", token_file=serve.pool_token_file)
    try:
        [gid] = backend.submit(1)
        # ...are not passed on: the worker gets the file's path, and registers with the token in it
        wait_for(lambda: [w for w in serve.client().request("GET", "/status")["workers"]
                          if w["glidein_id"] == gid], 60, "the local worker to register")
        pid = backend.pids()[gid]  # registered: long past exec, so /proc shows the worker itself
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    finally:
        backend.close()
    assert argv[argv.index(b"--token-file") + 1] == str(serve.pool_token_file).encode()
    for secret in (serve.pool_token, serve.api_token):
        assert not any(secret.encode() in a for a in argv + environ)
    assert not any(e.startswith((b"PCM_POOL_TOKEN=", b"PCM_API_TOKEN=")) for e in environ)
    log = (tmp_path / "glideins" / gid / "worker.log").read_text()
    assert serve.pool_token not in log


def test_worker_without_or_with_a_wrong_pool_token_exits_2(serve: ServeProcess, tmp_path: Path) -> None:
    def worker(*args: str) -> tuple[int, str]:
        res = subprocess.run([sys.executable, "-m", "pcm_service.cli", "worker", "--service", serve.url,
                              "--work-dir", str(tmp_path / "w"), "--no-serve-blobs", *args],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        return res.returncode, " ".join(res.stderr.split())

    code, err = worker()
    assert code == 2 and "pass --token-file STATE_DIR/pool.token" in err, err
    code, err = worker("--token-file", str(serve.api_token_file))  # the other kind
    assert code == 2 and f"the service refused the pool token in {serve.api_token_file}" in err, err
    assert serve.api_token not in err
    assert serve.client().request("GET", "/status", all=True)["workers"] == []
