"""The interface every glidein backend implements (one small class per batch system)."""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional


class GlideinState(str, enum.Enum):
    IDLE = "idle"  # queued in the batch system, not running yet
    RUNNING = "running"
    HELD = "held"
    EXITED = "exited"  # completed or removed; reported once, then forgotten


@dataclass
class Glidein:
    glidein_id: str
    state: GlideinState
    host: Optional[str] = None
    detail: str = ""


class GlideinBackend(ABC):
    name: str = "abstract"

    @abstractmethod
    def submit(self, count: int) -> list[str]:
        """Start ``count`` glideins; return their ids."""

    @abstractmethod
    def list(self) -> list[Glidein]:
        """This factory's glideins, as the batch system sees them now."""

    @abstractmethod
    def remove(self, glidein_ids: list[str]) -> None:
        """Ask the glideins to stop (gracefully: the worker drains on SIGTERM)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds; the local backend stops its workers."""
