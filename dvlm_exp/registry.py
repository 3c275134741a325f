"""Lazy name -> object registries with "did you mean" errors (lm-evaluation-harness style).

Entries are registered as dotted import paths, so listing or validating names never imports
torch. `get(name)` imports the target on first use.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any


class UnknownNameError(ValueError):
    pass


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._paths: dict[str, str] = {}

    def register(self, name: str, target: str) -> None:
        if name in self._paths and self._paths[name] != target:
            raise ValueError(f"{self.kind} {name!r} is already registered as {self._paths[name]}")
        self._paths[name] = target

    def names(self) -> list[str]:
        return sorted(self._paths)

    def check(self, name: str) -> None:
        if name not in self._paths:
            close = difflib.get_close_matches(name, self._paths, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}. Valid choices: {', '.join(self.names())}.{hint}"
            )

    def get(self, name: str) -> Any:
        self.check(name)
        module, _, attr = self._paths[name].rpartition(".")
        return getattr(importlib.import_module(module), attr)


# Pruning methods: one file each in dvlm_exp/pruning/, one yaml each in conf/prune/.
PRUNERS = Registry("pruning method")
PRUNERS.register("none", "dvlm_exp.pruning.none.NoPruning")
PRUNERS.register("random", "dvlm_exp.pruning.random.RandomPruning")
PRUNERS.register("fastv", "dvlm_exp.pruning.fastv.FastV")
PRUNERS.register("redvtp", "dvlm_exp.pruning.redvtp.RedVTP")
PRUNERS.register("sparsevlm", "dvlm_exp.pruning.sparsevlm.SparseVLM")
PRUNERS.register("divprune", "dvlm_exp.pruning.divprune.DivPrune")
PRUNERS.register("vtw", "dvlm_exp.pruning.vtw.VTW")
PRUNERS.register("tome", "dvlm_exp.pruning.tome.ToMe")
PRUNERS.register("visipruner", "dvlm_exp.pruning.visipruner.VisiPruner")
PRUNERS.register("skip", "dvlm_exp.pruning.skip.LayerSkip")

# Model families: one file each in dvlm_exp/models/, yamls in conf/model/ name a family.
MODEL_FAMILIES = Registry("model family")
MODEL_FAMILIES.register("llada_v", "dvlm_exp.models.llada_v.LLaDAV")
MODEL_FAMILIES.register("lavida_llada", "dvlm_exp.models.lavida.LaViDaLLaDA")
MODEL_FAMILIES.register("lavida_dream", "dvlm_exp.models.lavida.LaViDaDream")
MODEL_FAMILIES.register("llava_1_5", "dvlm_exp.models.llava_hf.LlavaHF")  # AR baselines (engine/ar.py)
MODEL_FAMILIES.register("llava_next", "dvlm_exp.models.llava_hf.LlavaNextHF")

# Denoising-step schedules (conf/schedule/): when a pruning decision is taken.
SCHEDULES = Registry("schedule")
SCHEDULES.register("first_step", "dvlm_exp.schedule.FirstStep")
SCHEDULES.register("at_step", "dvlm_exp.schedule.AtStep")
SCHEDULES.register("start_frac", "dvlm_exp.schedule.StartFrac")
SCHEDULES.register("late_step", "dvlm_exp.schedule.LateStep")
SCHEDULES.register("progressive", "dvlm_exp.schedule.Progressive")
SCHEDULES.register("every_step", "dvlm_exp.schedule.EveryStep")
SCHEDULES.register("confidence", "dvlm_exp.schedule.Confidence")
