"""Schedule `confidence` (conf/schedule/confidence.yaml)."""

from __future__ import annotations

from dvlm_exp.registry import SCHEDULES
from dvlm_exp.schedules.base import Schedule


@SCHEDULES.register("confidence")
class Confidence(Schedule):
    """Start when the answer's confidence rises: act once, at the first step after the mean
    top-1 probability of the still-masked slots (observed after each step) reached `threshold`;
    at `max_step` at the latest (null: never forced)."""

    def __init__(self, threshold: float = 0.5, max_step: int | None = None, **kw):
        super().__init__(**kw)
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"schedule.threshold={threshold} must be in (0, 1]")
        self.threshold = float(threshold)
        self.max_step = None if max_step is None else int(max_step)
        self.fire_at: int | None = None
        self.fired_step: int | None = None

    def begin(self, total_steps: int) -> None:
        super().begin(total_steps)
        self.fire_at, self.fired_step = None, None

    def observe(self, step: int, confidence: float) -> None:
        if self.fire_at is None and confidence >= self.threshold:
            self.fire_at = step + 1

    def acts_at(self, step: int) -> bool:
        if self.fired_step is not None:
            return step == self.fired_step
        hit = (self.fire_at is not None and step >= self.fire_at) or (self.max_step is not None and step >= self.max_step)
        if hit:
            self.fired_step = step
        return hit

    def steps(self) -> list[int]:
        return [] if self.fired_step is None else [self.fired_step]
