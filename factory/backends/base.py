"""The interface every glidein backend implements (one small class per batch system)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from pcm_service.protocol import Glidein, GlideinState

if TYPE_CHECKING:
    from factory.config import FactoryConfig

__all__ = ["BackendError", "Glidein", "GlideinBackend", "GlideinState"]


class BackendError(RuntimeError):
    """The batch system cannot be reached or refused a request; the message says what to check."""


class GlideinBackend(ABC):
    name: str = "abstract"

    @classmethod
    @abstractmethod
    def from_config(cls, config: "FactoryConfig") -> "GlideinBackend":
        """The backend a factory config describes (``config.backend`` names it)."""

    @abstractmethod
    def submit(self, count: int) -> list[str]:
        """Start ``count`` glideins; return their ids."""

    @abstractmethod
    def glideins(self) -> list[Glidein]:
        """This factory's glideins as the batch system sees them now. Ones that left since the
        last call are returned once more as EXITED (with why), then forgotten."""

    @abstractmethod
    def remove(self, glidein_ids: list[str]) -> None:
        """Ask the glideins to stop (gracefully: the worker drains on SIGTERM)."""

    def evict(self, glidein_id: str, hard: bool) -> None:
        """Preempt a glidein as the batch system would (the eviction drill): ``hard`` kills it
        at once, otherwise it is vacated (SIGTERM: the worker drains, then it may run again)."""
        raise BackendError(f"the {self.name} backend cannot evict glideins")

    def configure(self, config: "FactoryConfig") -> None:  # noqa: B027 - optional hook
        """The factory config file changed: take the new settings for later submits."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds; the local backend stops its workers."""
