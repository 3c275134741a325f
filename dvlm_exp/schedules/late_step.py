"""Schedule `late_step` (conf/schedule/late_step.yaml)."""

from __future__ import annotations

from dvlm_exp.registry import SCHEDULES
from dvlm_exp.schedules.start_frac import StartFrac


@SCHEDULES.register("late_step")
class LateStep(StartFrac):
    def __init__(self, frac: float = 0.75, **kw):
        super().__init__(frac=frac, **kw)
