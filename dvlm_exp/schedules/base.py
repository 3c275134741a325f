"""The schedule interface (see the package docstring)."""

from __future__ import annotations


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
