"""One interface for every executor (like a factory backend): start, stop, where workers
connect, and its own view of its workers."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

from pcm_service.protocol import ExecutorInfo, ExecutorKind, TaskVineStatus


class Executor(ABC):
    kind: ExecutorKind

    @abstractmethod
    def start(self) -> None:
        """Begin running leased batches (called when the service starts)."""

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def info(self) -> ExecutorInfo:
        """What a glidein needs to join: sent to `pcm worker` before anything else."""

    def status(self) -> Optional[TaskVineStatus]:
        return None


class NativeExecutor(Executor):
    """PCM's own workers lease and report over HTTP: the service runs nothing for them."""

    kind = ExecutorKind.NATIVE

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(kind=self.kind)
