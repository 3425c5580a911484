"""A clock tests set by hand: the service core takes ``clock=``."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pcm_service.core import ServiceCore


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def clock_of(core: ServiceCore) -> FakeClock:
    """The FakeClock a test gave ``core`` (typed as the core's plain ``() -> float`` clock)."""
    assert isinstance(core.clock, FakeClock)
    return core.clock
