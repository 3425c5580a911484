"""The agent's side of one library process: start it, wait for its engine, talk to it."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Callable, Optional

from pcm_service.procfs import process_tree, running
from pcm_service.protocol import BatchLease, ContextSpec, RowResult
from worker_image.library import AUTHKEY_ENV, ROW_RESULTS


class LibraryFailed(RuntimeError):
    pass


class LibraryHandle:
    def __init__(self, context: ContextSpec, work_dir: Path, engine: str = "vllm",
                 sock_root: Optional[Path] = None) -> None:
        """``sock_root``: a short directory for the socket (AF_UNIX limit), e.g. the glidein's
        own temporary directory, which goes with the glidein; default: the system's."""
        self.context = context
        self._sock_dir = tempfile.mkdtemp(prefix="pcm-lib-", dir=sock_root)
        address = os.path.join(self._sock_dir, "library.sock")
        key = secrets.token_bytes(16)
        self._listener = Listener(address, family="AF_UNIX", authkey=key)
        ctx_file = work_dir / f"{context.context_id}.json"
        ctx_file.write_text(context.model_dump_json())
        self.log_path = work_dir / f"library-{context.context_id}-{int(time.time())}.log"
        env = dict(os.environ, **{AUTHKEY_ENV: key.hex()})
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker_image.library", "--address", address,
                 "--context-file", str(ctx_file), "--engine", engine, "--spawned-at", str(time.time())],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.conn: Optional[Connection] = None
        self.capacity = 0  # rows the engine runs at once, known once it is ready
        self._accepted = threading.Event()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="pcm-lib-accept").start()

    def _accept(self) -> None:
        try:
            self.conn = self._listener.accept()
        except OSError:
            pass  # listener closed: the library never connected
        self._accepted.set()

    def _wait_for(self, done: Callable[[], bool], phase: str, timeout: float, deadline: float,
                  cancelled: threading.Event) -> None:
        while not done():
            if self.proc.poll() is not None:
                raise LibraryFailed(f"library exited with code {self.proc.returncode}"
                                    f" {phase}; see {self.log_path}")
            if cancelled.is_set():
                raise LibraryFailed(f"engine start cancelled {phase}")
            if time.monotonic() > deadline:
                raise LibraryFailed(f"engine did not start within {timeout:.0f}s; see {self.log_path}")

    @classmethod
    def started(cls, context: ContextSpec, work_dir: Path, engine: str, timeout: float,
                cancelled: threading.Event, sock_root: Optional[Path] = None) -> tuple["LibraryHandle", float]:
        """A library whose engine is ready, and its load time; one that fails (or is cancelled)
        is stopped again and raises LibraryFailed."""
        lib = cls(context, work_dir, engine, sock_root)
        try:
            return lib, lib.wait_ready(timeout, cancelled)
        except LibraryFailed:
            lib.stop(grace=1)
            raise

    def wait_ready(self, timeout: float, cancelled: threading.Event) -> float:
        """Block until the engine is loaded; returns the load time the library measured."""
        deadline = time.monotonic() + timeout
        self._wait_for(lambda: self._accepted.wait(0.2), "before connecting", timeout, deadline,
                       cancelled)
        conn = self.conn
        if conn is None:
            raise LibraryFailed(f"library never connected; see {self.log_path}")
        self._wait_for(lambda: conn.poll(0.2), "while loading", timeout, deadline, cancelled)
        msg = conn.recv()
        if msg[0] == "failed":
            raise LibraryFailed(msg[1])
        self.capacity = int(msg[2])
        return float(msg[1])

    def send_batch(self, lease: BatchLease) -> None:
        assert self.conn is not None
        with self._send_lock:
            self.conn.send(("batch", lease.model_dump_json()))

    def recv(self) -> tuple:
        assert self.conn is not None
        return self.conn.recv()

    def receive(self, on_rows: Callable[[int, list[RowResult]], None], on_end: Callable[[], None]) -> None:
        """In a thread of its own: each batch's finished rows to ``on_rows`` (once per engine
        step), then ``on_end`` when the library has gone."""
        def loop() -> None:
            while True:
                try:
                    msg = self.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "rows":
                    for batch_id, rows in msg[1].items():
                        on_rows(batch_id, ROW_RESULTS.validate_json(rows))
            on_end()
        threading.Thread(target=loop, daemon=True, name="pcm-lib-recv").start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """Ask the library to shut its engine down; after ``grace`` seconds kill it, and kill
        whatever it leaves behind: a killed library's engine processes would otherwise live on,
        orphaned, holding the model in memory (its children are listed first, while they are
        still its children)."""
        engine_procs = process_tree(self.proc.pid)
        if self.conn is not None:
            try:
                with self._send_lock:
                    self.conn.send(("shutdown",))
            except OSError:
                pass
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for proc in engine_procs:
            if running(proc):
                try:
                    os.kill(proc[0], signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it exited meanwhile
        self._listener.close()
        if self.conn is not None:
            self.conn.close()
        try:
            os.unlink(os.path.join(self._sock_dir, "library.sock"))
            os.rmdir(self._sock_dir)
        except OSError:
            pass
