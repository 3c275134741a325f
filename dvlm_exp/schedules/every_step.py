"""Schedule `every_step` (conf/schedule/every_step.yaml)."""

from __future__ import annotations

from dvlm_exp.registry import SCHEDULES
from dvlm_exp.schedules.base import Schedule


@SCHEDULES.register("every_step")
class EveryStep(Schedule):
    """Re-select at every step from `start` on, from the full token set (nothing persists)."""

    persist = "none"

    def __init__(self, start: int = 0, **kw):
        super().__init__(**kw)
        self.start = int(start)

    def acts_at(self, step: int) -> bool:
        return step >= self.start
