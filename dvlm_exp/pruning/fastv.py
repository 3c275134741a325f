"""FastV (Chen et al., ECCV 2024) for diffusion and AR VLMs.

Visual token i scores the attention it receives at layer K-1, averaged over heads (per-head
softmax, then mean) and over a query set; the top `ratio` are kept, indices sorted, and
layers K.. see only them. Query sets:
  last_token        the last position (FastV code; in a dLLM a response mask slot)
  all               every position (FastV paper definition)
  masked_response   response slots still masked (diffusion counterpart)
  last_prompt_token the last prompt position (AR-like counterpart)
Peer definitions (the dMLLM study's port, LLaDA-V/eval/llava_fastv/model/language_model/
modeling_llada.py: scaled_dot_product_attention and LLaDADecoderLayer.forward):
  score: head_mean_softmax (default, FastV's own code) | softmax_of_head_mean_logits (the port:
         softmax over keys of the head-mean logits, no mask bias, summed over the queries)
  order: position (default: kept tokens in sequence order) | score (the port: torch.topk order,
         descending score; with renumbered positions the model sees them re-ordered)
"""

from __future__ import annotations

import torch

from dvlm_exp.engine.state import Decision, Roles
from dvlm_exp.pruning.base import PruneMethod, topk_sorted
from dvlm_exp.registry import PRUNERS

QUERY_SETS = ("last_token", "all", "masked_response", "last_prompt_token")
SCORES = ("head_mean_softmax", "softmax_of_head_mean_logits")
ORDERS = ("position", "score")


@PRUNERS.register("fastv")
class FastV(PruneMethod):
    layer_fields = {"layer": 1}  # config fields holding decoder-layer indices: smallest legal value
    choices = {"query_set": QUERY_SETS, "score": SCORES, "order": ORDERS}
    name = "fastv"
    needs_attention = True

    def __init__(self, query_set: str = "last_token", score: str = "head_mean_softmax", order: str = "position",
                 **kwargs):
        super().__init__(**kwargs)
        if query_set not in QUERY_SETS:
            raise ValueError(f"prune.query_set must be one of {', '.join(QUERY_SETS)}, got {query_set!r}")
        if score not in SCORES:
            raise ValueError(f"prune.score must be one of {', '.join(SCORES)}, got {score!r}")
        if order not in ORDERS:
            raise ValueError(f"prune.order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.score, self.order = score, order
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

    def score_request(self, view):
        req = super().score_request(view)
        if req is not None and self.score == "softmax_of_head_mean_logits":
            req.aggregate = "softmax_mean_logits"
        return req

    def decide(self, view):
        if view.layer != self.layer or view.n_visual == 0 or self.score == "head_mean_softmax":
            return super().decide(view)
        req = view.scores.get(self.layer - 1)  # the port ranks by the sum over queries (not a mean)
        scores = None if req is None else req.column_sum[view.roles == Roles.VISUAL]
        return Decision(keep=self.select(view, scores))

    def select(self, view, scores):
        if self.order == "score":
            return torch.topk(scores, self.k(view)).indices  # descending score, as torch.topk returns
        return topk_sorted(scores, self.k(view))
