"""Denoising-step schedules: at which global forwards (steps) a method acts, with what keep
ratio, and how its decisions persist (engine docstring: state | replay | none).

Steps are counted globally across blocks (the dMLLM study's convention): step 0 is the first
forward of the first block. `begin(total_steps)` is called per sample.

  first_step   act at step 0, persist                      (LLaDA-FastV, RedVTP, study Tables 1-2)
  at_step      act at step `step`, persist
  start_frac   act at step floor(frac * S), persist         (study Table 3: start 25 / 50 / 75 %)
  late_step    start_frac with frac 0.75 by default          (the study's step-47-of-64 port)
  progressive  act at floor(f * S) for f in `fracs`, the keep ratio falling linearly from 1 to
               `ratio` over the stages, each stage pruning the already-pruned state
  every_step   act at every step from `start`, re-selecting from the full set (persist none)
  confidence   act once, at the first step after the mean top-1 probability of the still-masked
               answer slots reached `threshold` (the study's logits signal); `max_step` forces it
"""

from __future__ import annotations

import math


class Schedule:
    persist = "state"

    def __init__(self, persist: str | None = None, **_):
        if persist is not None:
            self.persist = persist
        self.total_steps = 0

    def begin(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)

    def acts_at(self, step: int) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def ratio_at(self, step: int, ratio: float) -> float:
        return ratio

    def steps(self) -> list[int]:
        """The acting steps among range(total_steps) (for plans and reports)."""
        return [s for s in range(self.total_steps) if self.acts_at(s)]


class FirstStep(Schedule):
    """Decide at step 0 and keep the pruned sequence for all later steps (LLaDA-FastV, RedVTP)."""

    def __init__(self, step: int = 0, **kw):
        super().__init__(**kw)
        self.step = 0

    def acts_at(self, step: int) -> bool:
        return step == self.step


class AtStep(Schedule):
    """Decide at global step `step` and persist from then on."""

    def __init__(self, step: int, **kw):
        super().__init__(**kw)
        self.step = int(step)

    def acts_at(self, step: int) -> bool:
        return step == self.step


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


class LateStep(StartFrac):
    def __init__(self, frac: float = 0.75, **kw):
        super().__init__(frac=frac, **kw)


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


class EveryStep(Schedule):
    """Re-select at every step from `start` on, from the full token set (nothing persists)."""

    persist = "none"

    def __init__(self, start: int = 0, **kw):
        super().__init__(**kw)
        self.start = int(start)

    def acts_at(self, step: int) -> bool:
        return step >= self.start


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
