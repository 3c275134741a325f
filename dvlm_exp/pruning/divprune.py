"""DivPrune (Alvar et al., CVPR 2025; vbdi/divprune): keep a maximally diverse subset.

No attention: the visual tokens' features (at layer 0 the projected visual embeddings the LLM
receives, i.e. `view.hidden` == the input embeddings; at layer K > 0 the hidden states there)
give a distance matrix D = 1 - cosine. A greedy max-min search picks k = round(ratio * N)
tokens: after the first pick, each pick is the unselected token whose minimum distance to the
selected set is largest. The kept indices are sorted, and the sequence is shortened (a
pre-LLM method: positions renumber, conf/prune/divprune.yaml).

First pick (`pivot`):
  paper   the token whose nearest neighbour (excluding itself) is farthest (the released
          code: the 2nd smallest entry of its distance row)
  random  a uniformly drawn token (the dMLLM study's LLaDA-V port); drawn from the method's
          own generator, reseeded per sample by the generator (`reseed`), so a sample's
          subset does not depend on which samples ran before it.

All visual tokens of the request form one set (the study selects per image; with one image
per request the two agree). Newline tokens are ordinary visual tokens, as in both codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvlm_exp.engine.state import Decision
from dvlm_exp.pruning.base import PruneMethod
from dvlm_exp.registry import PRUNERS

PIVOTS = ("paper", "random")


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[N, d] -> [N, N] 1 - cosine similarity, in float32."""
    xn = F.normalize(x.float(), dim=-1)
    return 1.0 - xn @ xn.T


def paper_pivot(dist: torch.Tensor) -> int:
    """The token whose nearest other token is farthest away (first index on ties)."""
    d = dist.clone()
    d.fill_diagonal_(float("inf"))
    return int(torch.argmax(d.min(dim=1).values))


def max_min_greedy(dist: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Greedy max-min subset of size k starting from `first`; returns sorted indices.

    Each step takes the unselected token with the largest minimum distance to the selected
    set (first index on ties). Selected tokens are excluded explicitly (the released code
    relies on their own distance being ~0, which fails for exact duplicates such as
    newline tokens).
    """
    n = dist.shape[0]
    k = max(1, min(int(k), n))
    selected = torch.empty(k, dtype=torch.long, device=dist.device)
    selected[0] = first
    dmin = dist[first].clone()
    dmin[first] = float("-inf")
    for i in range(1, k):
        j = torch.argmax(dmin)
        selected[i] = j
        dmin = torch.minimum(dmin, dist[j])
        dmin[j] = float("-inf")  # -inf stays -inf under the running minimum
    return torch.sort(selected).values


@PRUNERS.register("divprune")
class DivPrune(PruneMethod):
    layer_fields = {"layer": 0}  # config fields holding decoder-layer indices: smallest legal value
    choices = {"pivot": ("paper", "random")}
    name = "divprune"

    def __init__(self, pivot: str = "paper", **kwargs):
        super().__init__(**kwargs)
        if pivot not in PIVOTS:
            raise ValueError(f"prune.pivot must be one of {', '.join(PIVOTS)}, got {pivot!r}")
        if self.layer < 0:
            raise ValueError("prune.layer must be >= 0")
        self.pivot = pivot
        self.generator = torch.Generator().manual_seed(self.seed)

    def reseed(self, seed: int) -> None:
        """Per-sample seed for the random pivot (the generator calls this per request)."""
        self.generator.manual_seed(int(seed))

    def decide(self, view) -> Decision | None:
        if view.layer != self.layer or view.n_visual == 0:
            return None
        n = view.n_visual
        k = self.k(view)
        if k >= n:
            return None  # nothing to drop: the forward is the unpruned one
        return Decision(keep=self.select(view, None))

    def select(self, view, scores=None) -> torch.Tensor:
        feats = view.hidden[0, view.visual_index]
        dist = cosine_distance(feats)
        n = dist.shape[0]
        if self.pivot == "paper":
            first = paper_pivot(dist)
        else:
            first = int(torch.randint(0, n, (1,), generator=self.generator))
        return max_min_greedy(dist, self.k(view), first)
