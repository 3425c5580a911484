"""Wakes long-polling fetch requests when a transfer finishes or a source frees up."""
from __future__ import annotations

import asyncio
from typing import Optional


class Changes:
    def __init__(self) -> None:
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.event: Optional[asyncio.Event] = None

    def bind(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def _fire(self) -> None:
        ev, self.event = self.event, asyncio.Event()
        if ev is not None:
            ev.set()

    def notify(self) -> None:  # called from any thread
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fire)
