"""Denoising-step schedules: at which global forward (step) a pruning decision is taken.

Steps are counted globally across blocks (the dMLLM study's convention): step 0 is the first
forward of the first block. A decision taken at step s persists: later steps run on the
pruned sequence in every layer.
"""

from __future__ import annotations


class FirstStep:
    """Decide at step 0 and keep the pruned sequence for all later steps (LLaDA-FastV, RedVTP)."""

    def __init__(self, step: int = 0, **_):
        self.step = 0

    def acts_at(self, step: int) -> bool:
        return step == self.step


class AtStep:
    """Decide at global step `step` and persist from then on."""

    def __init__(self, step: int, **_):
        self.step = int(step)

    def acts_at(self, step: int) -> bool:
        return step == self.step
