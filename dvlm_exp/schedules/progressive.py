"""Schedule `progressive` (conf/schedule/progressive.yaml)."""

from __future__ import annotations

import math

from dvlm_exp.registry import SCHEDULES
from dvlm_exp.schedules.base import Schedule


@SCHEDULES.register("progressive")
class Progressive(Schedule):
    """Staged drops: at floor(f_i * S) keep 1 - (1 - ratio) * (i + 1) / n of the original visual
    tokens; each stage prunes the state the previous one left."""

    def __init__(self, fracs=(0.0, 0.25, 0.5, 0.75), **kw):
        super().__init__(**kw)
        self.fracs = [float(f) for f in fracs]
        if not self.fracs or any(not 0.0 <= f < 1.0 for f in self.fracs) or self.fracs != sorted(set(self.fracs)):
            raise ValueError(f"schedule.fracs={list(fracs)} must be increasing fractions in [0, 1)")

    def _stages(self) -> list[int]:
        return [int(math.floor(f * self.total_steps + 1e-9)) for f in self.fracs]

    def acts_at(self, step: int) -> bool:
        return step in self._stages()

    def ratio_at(self, step: int, ratio: float) -> float:
        stages = self._stages()
        # several fractions may land on one step when S is small: the last stage of that step wins
        i = max((j for j, s in enumerate(stages) if s <= step), default=-1)
        if i < 0:
            return 1.0
        return 1.0 - (1.0 - ratio) * (i + 1) / len(stages)
