"""`pcm status` in a real 80x24 terminal (tmux): no cell cut short, no row wrapped, every part
of the pool visible; `--watch` redraws in place."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pcm_service.cli.status_compact import short
from tests.support.pool import watched_pool
from tests.support.serve import ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
WIDTH, HEIGHT = 80, 24


class Terminal:
    """A detached tmux session of WIDTH x HEIGHT on its own server socket."""

    def __init__(self, tmp_path: Path) -> None:
        self.sock = f"pcm-test-{uuid.uuid4().hex[:8]}"
        self.tmp_path = tmp_path

    def tmux(self, *args: str, timeout: float = 30) -> str:
        return subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", *args], check=True, text=True,
                              capture_output=True, timeout=timeout).stdout

    def start(self, command: list[str], env: dict[str, str]) -> None:
        """Run ``command``; the session signals the channel ``done`` when it exits, then stays."""
        script = self.tmp_path / f"{self.sock}.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        script.write_text(f"#!/bin/sh\n{exports}{shlex.join(command)}\n"
                          f"tmux -L {self.sock} wait-for -S done\nsleep 600\n")
        script.chmod(0o755)
        self.tmux("new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), str(script))

    def screen(self, joined: bool = False) -> list[str]:
        """The pane as shown (``joined``: wrapped lines joined back into the rows they were)."""
        out = self.tmux("capture-pane", "-p", *(("-J",) if joined else ()), "-S", "-")
        return out.rstrip("\n").split("\n")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=30)


def status_env(serve: ServeProcess) -> dict[str, str]:
    return {"PCM_API_TOKEN_FILE": str(serve.api_token_file), "TERM": "xterm-256color", "LANG": "C.UTF-8"}


def test_status_fits_an_80_by_24_terminal(serve: ServeProcess, tmp_path: Path) -> None:
    pool = watched_pool(serve, tmp_path)
    term = Terminal(tmp_path)
    try:
        term.start([sys.executable, "-m", "pcm_service.cli", "status", "--service", serve.url], status_env(serve))
        term.tmux("wait-for", "done", timeout=120)
        shown, joined = term.screen(), term.screen(joined=True)
    finally:
        term.close()
    text = "\n".join(shown)
    assert shown == joined, "a row wrapped:\n" + text  # (-J joins wrapped lines: equal means none wrapped)
    assert len(shown) <= HEIGHT and all(len(line) <= WIDTH for line in shown), text
    assert "…" not in text and "..." not in text, "a cell was cut short:\n" + text
    for sub in pool.workloads:
        assert short(sub.workload_id) in text
    assert "fact-check" in text and "summaries" in text and "2000" in text and "1500" in text
    assert "Glideins: 0 idle, 3 running, 1 held" in text
    assert "Workers:  3 (1 starting, 1 idle, 1 busy)" in text
    assert "Contexts: 1 loading, 1 ready, 1 failed" in text
    assert "1207.3 held" in text
    for wid in pool.workers:
        assert short(wid) in text
    busy = next(line for line in shown if line.startswith(short(pool.workers[0])))
    assert busy.split()[1:4] == ["1207.0", "node-0", "busy"] and busy.split()[-2:] == ["120", "1"]


def test_status_watch_redraws_in_place_with_recent_rows_per_second(serve: ServeProcess, tmp_path: Path) -> None:
    watched_pool(serve, tmp_path)
    term = Terminal(tmp_path)
    try:
        term.start([sys.executable, "-m", "pcm_service.cli", "status", "--service", serve.url, "--watch",
                    "--interval", "0.5"], status_env(serve))
        stamps: set[str] = set()
        deadline = time.monotonic() + 60
        while len(stamps) < 3 and time.monotonic() < deadline:  # until it has redrawn twice
            heads = [line for line in term.screen() if line.startswith("Every 0.5s: pcm status")]
            stamps |= set(heads)
        shown = term.screen()
    finally:
        term.close()
    assert len(stamps) >= 3, f"no redraws seen: {stamps}"
    heads = [line for line in shown if line.startswith("Every 0.5s")]
    assert len(heads) == 1, "\n".join(shown)  # redrawn in place, not printed again below
    assert "rows/s over the last minute" in heads[0]
    row = next(line for line in shown if "fact-check" in line)
    assert row.split()[-2] == "0.0"  # nothing ran during the watch: the last minute's rate is 0
