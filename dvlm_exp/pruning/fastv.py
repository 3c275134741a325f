"""FastV (Chen et al., ECCV 2024) for diffusion and AR VLMs.

Visual token i scores the attention it receives at layer K-1, averaged over heads (per-head
softmax, then mean) and over a query set; the top `ratio` are kept, indices sorted, and
layers K.. see only them. Query sets:
  last_token        the last position (FastV code; in a dLLM a response mask slot)
  all               every position (FastV paper definition)
  masked_response   response slots still masked (diffusion counterpart)
  last_prompt_token the last prompt position (AR-like counterpart)
"""

from __future__ import annotations

import torch

from dvlm_exp.engine.state import Roles
from dvlm_exp.pruning.base import PruneMethod, topk_sorted

from dvlm_exp.registry import PRUNERS

QUERY_SETS = ("last_token", "all", "masked_response", "last_prompt_token")


@PRUNERS.register("fastv")
class FastV(PruneMethod):
    layer_fields = {"layer": 1}  # config fields holding decoder-layer indices: smallest legal value
    choices = {"query_set": QUERY_SETS}
    name = "fastv"
    needs_attention = True

    def __init__(self, query_set: str = "last_token", **kwargs):
        super().__init__(**kwargs)
        if query_set not in QUERY_SETS:
            raise ValueError(f"prune.query_set must be one of {', '.join(QUERY_SETS)}, got {query_set!r}")
        if self.layer < 1:
            raise ValueError("FastV scores at layer K-1: prune.layer must be >= 1")
        self.query_set = query_set

    def query_index(self, view) -> torch.Tensor:
        roles = view.roles
        n = roles.numel()
        if self.query_set == "last_token":
            return torch.tensor([n - 1])
        if self.query_set == "all":
            return torch.arange(n)
        if self.query_set == "last_prompt_token":
            return torch.nonzero(roles != Roles.RESPONSE).squeeze(1)[-1:]
        idx = view.masked_response_index()
        return idx if idx.numel() else view.response_index

    def select(self, view, scores):
        return topk_sorted(scores, self.k(view))
