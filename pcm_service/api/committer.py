"""Group commit for the routes every worker calls all the time (lease, report, heartbeat).

Each of those calls is a small write transaction, and a commit (an fsync with
``synchronous=FULL``) costs more than the call's own statements. One thread runs them: every
call queued while the previous group was being written goes into the next group, which is one
transaction, each call in its own savepoint, and one commit. A call's answer is handed back
only once its group is committed, so an acknowledged result is still a durable one."""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, Optional, TypeVar

from pcm_service.store import Store

T = TypeVar("T")
MAX_GROUP = 128  # calls per commit: bounds how long the writer is held for one group

_Call = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _settle(done: list[tuple["asyncio.Future[Any]", Any]]) -> None:
    for fut, outcome in done:
        if fut.cancelled():  # the client went away; its call was still made (and committed)
            continue
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


class GroupCommitter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._calls: queue.SimpleQueue[Optional[_Call]] = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._starting = threading.Lock()

    def _start(self) -> None:
        with self._starting:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pcm-group-commit", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._starting:
            if self._thread is not None:
                self._calls.put(None)
                self._thread.join(timeout=5)
                self._thread = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the next group; returns (or raises) once that group is committed."""
        if self._thread is None:
            self._start()  # at the first call: an app run without its lifespan works too
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._calls.put((lambda: fn(*args), fut, loop))
        return await fut

    def _run(self) -> None:
        while True:
            first = self._calls.get()
            if first is None:
                return
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    nxt = self._calls.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._calls.put(None)  # stop after this group
                    break
                group.append(nxt)
            outcomes: list[Any]
            try:
                outcomes = self.store.run_group([fn for fn, _, _ in group])
            except Exception as e:  # the commit itself failed: no call of the group took effect
                outcomes = [e] * len(group)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
            for (_, fut, loop), outcome in zip(group, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((fut, outcome))
            for loop, done in by_loop.items():  # one wake-up of the event loop per group
                try:
                    loop.call_soon_threadsafe(_settle, done)
                except RuntimeError:  # that loop has closed: nobody waits for these answers
                    pass
