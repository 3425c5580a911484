"""Choosing the executor (`pcm serve/run --executor`): the one place the service side meets the
functions its TaskVine Library runs (worker_image.vine_library), which only the CLI may import."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcm_service.core import ServiceCore
from pcm_service.executors import Executor, NativeExecutor
from pcm_service.protocol import TASKVINE_PORT, ExecutorKind

TASKVINE_MISSING = ("TaskVine (ndcctools) is not installed in this environment: run `make taskvine`, or"
                    " `conda install -c conda-forge ndcctools`")
ExecutorOpt = typer.Option(ExecutorKind.NATIVE, "--executor", case_sensitive=False,
                           help="Who runs the batches: native (PCM's worker agents) or taskvine (TaskVine"
                                " workers of a manager in the service, a Library per context)")
VinePortOpt = typer.Option(TASKVINE_PORT, "--vine-port", min=0, help="TaskVine manager port (0: any free one)")
VineProjectOpt = typer.Option(None, "--vine-project", help="TaskVine project name of the manager")


def make_executor(kind: ExecutorKind, core: ServiceCore, pool_token: str, port: int = TASKVINE_PORT,
                  project: Optional[str] = None, ssl: Optional[tuple[Path, Path]] = None,
                  library: bool = True) -> Executor:
    """The executor of ``kind``; raises ImportError (with what to do) when TaskVine is missing."""
    if kind == ExecutorKind.NATIVE:
        return NativeExecutor(core)
    try:
        from pcm_service.executors.taskvine import TaskVineExecutor, TaskVineSettings, VineFunctions
    except ImportError as e:
        raise ImportError(TASKVINE_MISSING) from e
    from worker_image.vine_library import load_engine, run_batch, run_batch_cold

    try:
        return TaskVineExecutor(core, pool_token, VineFunctions(load_engine, run_batch, run_batch_cold),
                                TaskVineSettings(port=port, project=project, ssl=ssl, context_library=library))
    except ImportError as e:
        raise ImportError(TASKVINE_MISSING) from e
