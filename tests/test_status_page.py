"""The status page at `/` of a real `pcm serve`: in headless Chromium it logs in with the API
token and shows the pool; its session cookie reads the page's data and nothing else."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.pool import HELD_REASON, watched_pool
from tests.support.serve import ServeProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str, tmp_path: Path, *what: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``url`` until its scripts and their requests are done (virtual time)."""
    if CHROMIUM is None:
        if os.environ.get("PCM_REQUIRE_CHROMIUM"):
            pytest.fail("PCM_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={profile}", "--window-size=1100,800", "--virtual-time-budget=8000",
                          *what, url], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_the_status_page_shows_the_pool_in_headless_chromium(serve: ServeProcess, tmp_path: Path) -> None:
    pool = watched_pool(serve, tmp_path)
    url = f"{serve.url}/#token={serve.api_token}"
    shot = tmp_path / "status.png"
    browse(url, tmp_path, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    dom = browse(url, tmp_path, "--dump-dom").stdout
    rows = dict(re.findall(r'<tr data-workload="(wl-[0-9a-f]+)">(.*?)</tr>', dom))
    assert set(rows) == {s.workload_id for s in pool.workloads}, dom[-3000:]
    first, second = (rows[s.workload_id] for s in pool.workloads)
    assert "fact-check" in first and "120/2000" in first and "6%" in first and "<progress" in first
    assert "summaries" in second and "0/1500" in second and "queued" in second
    assert "Glideins: 3 running, 1 held" in dom and f"Held: 1207.3: {HELD_REASON}" in dom
    assert len(re.findall(r'<tr data-worker="w-', dom)) == 3
    assert '<form id="login" hidden' in dom  # logged in: the form is gone


def test_without_a_login_the_page_asks_for_the_token_and_shows_nothing(serve: ServeProcess, tmp_path: Path) -> None:
    pool = watched_pool(serve, tmp_path)
    dom = browse(f"{serve.url}/", tmp_path, "--dump-dom").stdout
    assert '<form id="login">' in dom and '<main id="status" hidden' in dom
    assert pool.workloads[0].workload_id not in dom
    wrong = browse(f"{serve.url}/#token=not-the-token", tmp_path, "--dump-dom").stdout
    assert "wrong token" in wrong and pool.workloads[0].workload_id not in wrong


def test_login_sets_a_cookie_that_reads_the_page_data_and_nothing_else(serve: ServeProcess) -> None:
    with httpx.Client(base_url=serve.url, timeout=30) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert http.get("/ui/status").status_code == 401
        assert http.post("/ui/login", data={"token": "not-the-token"}).status_code == 403
        assert http.post("/ui/login", data={"token": serve.pool_token}).status_code == 403
        r = http.post("/ui/login", data={"token": serve.api_token})
        assert r.status_code == 204
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert serve.api_token not in cookie  # a value derived from the token, not the token
        assert http.get("/ui/status").json()["demand"]["limits"]["max_workers"] >= 0
        assert http.get("/v1/pcm/status").status_code == 401  # the cookie opens the page's data only
        assert http.post("/ui/logout").status_code == 204
        assert http.get("/ui/status").status_code == 401
    assert httpx.get(f"{serve.url}/ui/status", headers={"Authorization": f"Bearer {serve.api_token}"},
                     timeout=30).status_code == 200
