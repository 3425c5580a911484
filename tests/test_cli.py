"""`pcm status`, `pcm factory set/show` against a real `pcm serve`."""
from __future__ import annotations

import json

from typer.testing import CliRunner, Result

from pcm_service.cli import app
from tests.support.serve import ServeProcess
from tests.support.workloads import WriteWorkload

runner = CliRunner()


def cli(serve: ServeProcess, *args: str) -> Result:
    """`pcm ARGS --service URL --token-file API_TOKEN` against the test's service."""
    return runner.invoke(app, [*args, "--service", serve.url, "--token-file", str(serve.api_token_file)])


def test_factory_set_then_show_and_status(serve: ServeProcess, write_workload: WriteWorkload) -> None:
    r = cli(serve, "factory", "set", "--min", "1", "--max", "3")
    assert r.exit_code == 0, r.output
    r = cli(serve, "factory", "show")
    assert "min 1, max 3" in r.output
    assert cli(serve, "submit", str(write_workload())).exit_code == 0
    r = cli(serve, "status", "--json")
    st = json.loads(r.output)
    assert st["workloads"][0]["rows_total"] == 20
    assert st["demand"]["workers_wanted"] == 1  # 4 batches, 1 worker per 4
    r = cli(serve, "status")
    row = next(line for line in r.output.splitlines() if line.startswith("wl-"))
    assert r.exit_code == 0 and row.split()[2:5] == ["0", "20", "0%"], r.output
    assert "Demand:   1 worker (min 1, max 3), 20 rows left" in r.output
    r = cli(serve, "status", "--wide")
    assert r.exit_code == 0 and "0/20 (0%)" in r.output and "Demand: 1 workers" in r.output


def test_factory_set_max_below_min_is_refused_and_changes_nothing(serve: ServeProcess) -> None:
    assert cli(serve, "factory", "set", "--max", "4").exit_code == 0
    r = cli(serve, "factory", "set", "--min", "5")
    assert r.exit_code == 2 and "max_workers (4) is below min_workers (5)" in r.output
    r = cli(serve, "factory", "show")
    assert "min 0, max 4" in r.output


def test_api_rejects_bad_submission_with_422(serve: ServeProcess) -> None:
    import httpx

    resp = httpx.post(f"{serve.url}/v1/pcm/workloads", json={"name": "x", "batch_size": 0},
                      headers={"Authorization": f"Bearer {serve.api_token}"})
    assert resp.status_code == 422
    assert cli(serve, "status", "--json").output.count('"workload_id"') == 0
