"""Schedule `start_frac` (conf/schedule/start_frac.yaml)."""

from __future__ import annotations

import math

from dvlm_exp.registry import SCHEDULES
from dvlm_exp.schedules.base import Schedule


@SCHEDULES.register("start_frac")
class StartFrac(Schedule):
    """Decide at step floor(frac * total_steps) and persist (the study's late-start pruning)."""

    def __init__(self, frac: float = 0.5, **kw):
        super().__init__(**kw)
        if not 0.0 <= float(frac) < 1.0:
            raise ValueError(f"schedule.frac={frac} must be in [0, 1)")
        self.frac = float(frac)

    @property
    def step(self) -> int:
        return int(math.floor(self.frac * self.total_steps + 1e-9))

    def acts_at(self, step: int) -> bool:
        return step == self.step
