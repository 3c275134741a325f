"""Schedule `at_step` (conf/schedule/at_step.yaml)."""

from __future__ import annotations

from dvlm_exp.registry import SCHEDULES
from dvlm_exp.schedules.base import Schedule


@SCHEDULES.register("at_step")
class AtStep(Schedule):
    """Decide at global step `step` and persist from then on."""

    def __init__(self, step: int, **kw):
        super().__init__(**kw)
        self.step = int(step)

    def acts_at(self, step: int) -> bool:
        return step == self.step
