"""Schedule `first_step` (conf/schedule/first_step.yaml)."""

from __future__ import annotations

from dvlm_exp.registry import SCHEDULES
from dvlm_exp.schedules.base import Schedule


@SCHEDULES.register("first_step")
class FirstStep(Schedule):
    """Decide at step 0 and keep the pruned sequence for all later steps (LLaDA-FastV, RedVTP)."""

    def __init__(self, step: int = 0, **kw):
        super().__init__(**kw)
        self.step = 0

    def acts_at(self, step: int) -> bool:
        return step == self.step
