"""HTTPS end to end with real processes and a real engine: `pcm tls init`, `pcm serve --tls-cert
--tls-key`, `pcm factory run --ca-file` whose local glideins get the CA, `pcm submit --ca-file
--wait`; a client with another CA, or with the system store, is refused."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcm_service.protocol import ServiceStatus
from tests.support import REPO
from tests.support.serve import ServeProcess
from tests.support.workloads import write_engine_workload

pytestmark = pytest.mark.engine
N_ROWS = 40


def pcm(*args: str, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcm_service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_a_workload_completes_over_https_and_another_ca_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    made = pcm("tls", "init", str(tmp_path / "tls"))
    assert made.returncode == 0, made.stderr
    ca, cert, key = (tmp_path / "tls" / n for n in ("ca.pem", "server.pem", "server.key"))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and ca.is_file() and cert.is_file()
    assert pcm("tls", "init", str(tmp_path / "other")).returncode == 0

    serve = ServeProcess(tmp_path / "state", "--tls-cert", str(cert), "--tls-key", str(key),
                         "--heartbeat-interval", "1", "--idle-timeout", "3", ca_file=ca).start()
    assert serve.url.startswith("https://")
    wl = write_engine_workload(tmp_path, tiny_model, N_ROWS)
    (tmp_path / "factory.yaml").write_text(yaml.safe_dump({
        "service": serve.url, "name": "tls", "backend": "local", "interval": 1.0, "ca_file": str(ca),
        "limits": {"min_workers": 0, "max_workers": 1, "per_cycle": 1},
        "local": {"work_dir": str(tmp_path / "glideins"), "token_file": str(serve.pool_token_file)}}))
    api = ("--service", serve.url, "--token-file", str(serve.api_token_file))
    with (tmp_path / "factory.log").open("ab") as log:
        factory = subprocess.Popen([sys.executable, "-m", "pcm_service.cli", "factory", "run", "--config",
                                    str(tmp_path / "factory.yaml"), "--token-file", str(serve.api_token_file)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        done = pcm("submit", str(wl), *api, "--ca-file", str(ca), "--wait", timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out = Path(done.stdout.split()[-1])
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(lines) == N_ROWS and all(x["error"] is None and x["text"] for x in lines)
        st = serve.client().request("GET", "/status", response=ServiceStatus, all=True)
        assert st.transfers.origin_bytes > 0  # the worker fetched the weights from the origin over HTTPS
        worker_logs = "".join(p.read_text() for p in (tmp_path / "glideins").rglob("worker.log"))
        assert f"with {serve.url}" in worker_logs  # "registered as w-… with https://…"

        for trust in (("--ca-file", str(tmp_path / "other" / "ca.pem")), ()):  # another CA; the system store
            refused = pcm("status", *api, *trust)
            assert refused.returncode != 0
            assert "does not verify" in refused.stderr and "--ca-file" in refused.stderr, refused.stderr
        plain = pcm("status", "--service", serve.url.replace("https:", "http:"), "--token-file",
                    str(serve.api_token_file), timeout=60)
        assert plain.returncode != 0  # plain HTTP to the TLS port gets nowhere
    finally:
        factory.terminate()
        factory.wait(60)
        serve.stop()
    for text in (serve.log_path.read_text(), (tmp_path / "factory.log").read_text(), worker_logs):
        assert serve.api_token not in text and serve.pool_token not in text
