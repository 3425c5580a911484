"""What a worker sends (its host, GPU names, a model's text) reaches the terminal as text: Rich
markup prints literally and control sequences (retitle, clear, colour) are written out as
escapes, in `pcm status`, `--wide`, `--watch` and `pcm run`'s summary (issue 28, item 6)."""
from __future__ import annotations

import io
import json
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from pcm_service.cli.status_compact import RecentRates, render_compact
from pcm_service.cli.status_view import render_status
from pcm_service.cli.summary import print_summary
from pcm_service.protocol import Resources, ServiceStatus, WorkerRegistration
from tests.support.serve import ServeProcess

TITLE = "pwned"
CONTROL_HOST = f"\x1b]0;{TITLE}\x07\x1b[2J"  # retitle the terminal, then clear it
MARKUP_HOST = "[red]x[/red][link=http://evil.example/]y[/link]"
GPU = "[blink]g\x1b[5m"
# what a terminal does with the raw strings: OSC (titles, hyperlinks), BEL, clear, red, blink
RAW = ("\x1b]", "\x07", "\x1b[2J", "\x1b[31m", "\x1b[5m")


def register(serve: ServeProcess) -> None:
    """Two workers with hostile strings, registered with the pool token as any glidein may."""
    serve.join(WorkerRegistration(host=CONTROL_HOST, pid=1, resources=Resources(gpus=[GPU])))
    serve.join(WorkerRegistration(host=MARKUP_HOST, pid=2))


def rendered(*renderables: object) -> str:
    """What a colour terminal would be sent."""
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=True, color_system="standard")
    for r in renderables:
        console.print(r)
    return buf.getvalue()


def assert_clean(text: str) -> None:
    for seq in RAW:
        assert seq not in text, f"{seq!r} reached the terminal:\n{text!r}"


class Terminal:
    """A detached 200x50 tmux session on its own server socket."""

    def __init__(self, tmp_path: Path) -> None:
        self.sock = f"pcm-hyg-{uuid.uuid4().hex[:8]}"
        self.tmp_path = tmp_path

    def tmux(self, *args: str, timeout: float = 60) -> str:
        return subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", *args], check=True, text=True,
                              capture_output=True, timeout=timeout).stdout

    def run(self, command: list[str], env: dict[str, str]) -> tuple[str, str]:
        """Run ``command`` in a fresh pane; once it signals ``done``: the pane (with its colours,
        ``-e``) and the pane's title."""
        script = self.tmp_path / f"{self.sock}.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        script.write_text(f"#!/bin/sh\n{exports}{shlex.join(command)}\n"
                          f"tmux -L {self.sock} wait-for -S done\nexec sleep 600\n")
        script.chmod(0o755)
        try:
            self.tmux("new-session", "-d", "-x", "200", "-y", "50", str(script))
            self.tmux("wait-for", "done", timeout=120)
            return self.tmux("capture-pane", "-p", "-e", "-S", "-"), self.tmux("display", "-p", "#{pane_title}")
        finally:
            subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("wide", [False, True], ids=["compact", "wide"])
def test_worker_strings_in_pcm_status_print_literally(serve: ServeProcess, tmp_path: Path, wide: bool) -> None:
    register(serve)
    env = {"PCM_API_TOKEN_FILE": str(serve.api_token_file), "TERM": "xterm-256color", "LANG": "C.UTF-8"}
    command = [sys.executable, "-m", "pcm_service.cli", "status", "--service", serve.url, *(["--wide"] * wide)]
    screen, title = Terminal(tmp_path).run(command, env)
    assert title.strip() != TITLE, "a worker's host retitled the terminal"
    assert_clean(screen)
    assert "\\x1b]0;pwned\\x07" in screen  # written out, not obeyed
    if wide:  # the compact view shows a host up to its first dot, 12 characters
        assert "\\x1b[2J" in screen and MARKUP_HOST in screen and "[blink]g\\x1b[5m" in screen
        assert "Workers (2)" in screen and "Workloads (0)" in screen  # not cleared away
    else:
        assert "[red]x[/red]" in screen
        assert "Glideins:" in screen and "Demand:" in screen


def test_every_status_view_escapes_worker_strings(serve: ServeProcess) -> None:
    """The views in-process (``--watch`` redraws render_compact with its rates), sent to a colour terminal."""
    register(serve)
    client = serve.client()
    try:
        st = client.request("GET", "/status", response=ServiceStatus)
    finally:
        client.close()
    rates = RecentRates()
    rates.add(st)
    for view in (render_compact(st), render_compact(st, rates), render_status(st)):
        text = rendered(view)
        assert_clean(text)
        assert "\\x1b]0;pwned\\x07" in text and "[red]x[/red]" in text


def test_run_summary_escapes_model_text(tmp_path: Path) -> None:
    """`pcm run`'s summary prints answers and errors that workers reported."""
    out = tmp_path / "out.jsonl"
    rows = [{"id": "[red]r1", "text": "[bold]Yes\x1b]0;pwned\x07 \x1b[2Jdone", "completion_tokens": 3},
            {"id": "r2", "error": "boom\x1b[31m[link=http://evil.example/]x", "text": None}]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    print_summary(out, Console(file=buf, width=200, force_terminal=True, color_system="standard"))
    text = buf.getvalue()
    assert_clean(text)
    assert "[red]r1" in text and "[bold]Yes\\x1b]0;pwned\\x07" in text
    assert "boom\\x1b[31m[link=http://evil.example/]x" in text
