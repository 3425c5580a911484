"""The factory's side: limits, demand, glideins as backends see them, cycle reports."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from pcm_service.protocol.base import Count, Positive, Strict
from pcm_service.protocol.states import GlideinState


class FactoryLimits(Strict):
    min_workers: Count = 0
    max_workers: Count = 1
    per_cycle: Positive = 4

    @model_validator(mode="after")
    def _ordered(self) -> "FactoryLimits":
        if self.max_workers < self.min_workers:
            raise ValueError(
                f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})"
            )
        return self


class Demand(Strict):
    workers_wanted: Count
    reason: str
    limits: FactoryLimits
    raw: Count = 0  # what the work alone asks for, before damping and limits
    rows_left: Count = 0
    batches_left: Count = 0
    rows_per_worker_second: Optional[float] = None  # measured; None before any worker ran rows
    time_to_ready: float = 0.0  # seconds from registration to a loaded engine (measured or assumed)
    ready_measured: bool = False


class Glidein(Strict):
    """One batch-system job running (or meant to run) one worker, as its backend sees it."""
    glidein_id: str  # HTCondor: "cluster.proc"
    state: GlideinState = Field(strict=False)
    host: Optional[str] = None
    gpus: list[str] = Field(default_factory=list)
    detail: str = ""  # hold reason, exit code, pid
    since: Optional[float] = None  # when it entered this state (unix time)


class FactoryDecision(Strict):
    at: float
    wanted: Count
    submit: Count = 0
    remove: list[str] = Field(default_factory=list)
    reason: str = ""


class FactoryReport(Strict):
    """What the factory last saw and did; it posts one every cycle."""
    factory: str
    backend: str
    at: float
    glideins: list[Glidein] = Field(default_factory=list)
    decisions: list[FactoryDecision] = Field(default_factory=list)


class FactoryView(Strict):
    limits: FactoryLimits
    config_limits: Optional[FactoryLimits] = None  # last limits a factory config file applied
    reports: list[FactoryReport] = Field(default_factory=list)
