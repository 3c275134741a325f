"""What a pruning method is: hooks the engine calls, never model code.

Before every decoder layer of a forward at an acting step the engine shows the method a
`View` (dvlm_exp.engine.engine.View) and calls, in this order:
  decide(view)          -> Decision | None   keep / merge visual tokens before this layer
  score_request(view)   -> ScoreRequest | None  attention rows to compute in this layer
  attention_edit(view)  -> edit | None       rewrite a few attention output rows in this layer
  skips_visual(view)    -> bool              visual tokens bypass this layer (every step)
After the sampler has unmasked at an acting step: after_step(view) -> Decision | None
(`view.scores` then holds the forward's score requests). A method keeps no model state; the
schedule (dvlm_exp.schedules) says when it acts and how its decisions persist.

Single-layer methods (FastV, random, ...) set `layer` (K: the first layer that sees the
pruned sequence) and implement `select(view, scores)`; the default hooks ask for scores at
K-1 when `needs_attention` and call `select` at K.
"""

from __future__ import annotations

import math

import torch

from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.state import Decision, Roles

ROUNDING = ("round", "floor")


def keep_count(n_visual: int, ratio: float, rounding: str = "round") -> int:
    """Visual tokens kept for keep ratio `ratio`, at least 1.

    round: round half to even (FastV HF port, DivPrune); floor: int(N * ratio) (RedVTP, the
    dMLLM study's ports). methods.md §0.1.
    """
    if n_visual == 0:
        return 0
    if rounding == "floor":
        k = int(math.floor(n_visual * ratio + 1e-9))
    elif rounding == "round":
        k = round(n_visual * ratio)
    else:
        raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")
    return max(1, min(n_visual, k))


class PruneMethod:
    name = "base"
    needs_attention = False
    active = True
    # Config facts, checked before any weight loads (dvlm_exp.run.validate, which reads them from
    # the source: declare them in the class body, as literals or names of module-level literals).
    # A subclass registers itself with @PRUNERS.register("<name>") and declares:
    #   layer_fields: config fields holding decoder-layer indices -> smallest legal value (every
    #     prune field named `layer`, `layers`, `*_layer` or `*_layers` is checked against the
    #     model's depth even when undeclared, lowest value 0);
    #   choices: fields with a closed set of values (position_ids and rounding are common to all);
    #   requires: {field: {value: {other_field: required value}}}.
    layer_fields: dict[str, int] = {"layer": 0}
    choices: dict[str, tuple] = {}
    requires: dict[str, dict] = {}
    # Methods that act in the vision path, before the LLM, set `tower_stage` (an instance may set
    # it from its options): the generator then hands the method and the question to the model's
    # `prepare(..., tower=method, question=text)`, whose vision path calls the method's tower hooks
    # (see dvlm_exp/engine/vision.py). None: the method acts in the decoder layer loop only.
    tower_stage: str | None = None

    def __init__(self, ratio: float = 1.0, layer: int = 0, seed: int = 0, rounding: str = "round",
                 position_ids: str = "keep", **kwargs):
        self.ratio = float(ratio)
        self.layer = int(layer)
        self.seed = int(seed)
        if rounding not in ROUNDING:
            raise ValueError(f"prune.rounding must be one of {', '.join(ROUNDING)}, got {rounding!r}")
        self.rounding = rounding
        self.position_ids = position_ids
        kwargs.pop("name", None)
        self.options = kwargs

    # ----------------------------------------------------------------- engine hooks
    def begin_sample(self) -> None:
        """Called once per request before its first forward."""

    def decide(self, view) -> Decision | None:
        if view.layer != self.layer or view.n_visual == 0:
            return None
        req = view.scores.get(self.layer - 1)
        scores = None if req is None else req.column_mean[view.roles == Roles.VISUAL]
        return Decision(keep=self.select(view, scores))

    def score_request(self, view) -> ScoreRequest | None:
        if self.needs_attention and view.layer == self.layer - 1:
            return ScoreRequest(self.query_index(view))
        return None

    def skips_visual(self, view) -> bool:
        return False

    def attention_edit(self, view):
        """An object with `apply(query, key, value, scaling, n_groups, out) -> out` that rewrites
        some rows of this layer's attention output ([1, n, h, dh], SDPA's), or None."""
        return None

    # ----------------------------------------------------------------- single-layer methods
    def k(self, view) -> int:
        return view.k(rounding=self.rounding)

    def query_index(self, view) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def select(self, view, scores: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values
