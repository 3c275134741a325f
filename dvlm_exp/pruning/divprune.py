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

Greedy search (`greedy`):
  max_min_distance   the running minimum of D = 1 - cos over the full distance matrix, argmax
                     (default, DivPrune's released code)
  min_max_similarity the dMLLM study's port (LLaDA-V/eval/llava_divprune/model/llava_arch.py,
                     min_max_greedy_search): features L2-normalised, similarities to each new
                     pick as one matrix-vector product, running MAXIMUM of the similarity, argmin.
                     The same search in exact arithmetic; float ties (1 - s rounds) can differ.
  The port draws its pivot as torch.randint(0, N, ()) from the global generator; ours from the
  method's generator reseeded per sample: the same draw when the global generator was seeded
  with the sample's seed just before (tests/test_study_ports.py).

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
GREEDY = ("max_min_distance", "min_max_similarity")


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


def min_max_similarity_greedy(feats: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """The study's port's search: sorted indices of k tokens, first pick `first`."""
    x = F.normalize(feats, p=2, dim=-1)
    n = x.shape[0]
    k = max(1, min(int(k), n))
    kept = [int(first)]
    run = x @ x[first]
    run[first] = float("inf")
    for _ in range(k - 1):
        j = int(torch.argmin(run))
        kept.append(j)
        run = torch.maximum(run, x @ x[j])
        run[j] = float("inf")
    return torch.sort(torch.tensor(kept, dtype=torch.long, device=feats.device)).values


@PRUNERS.register("divprune")
class DivPrune(PruneMethod):
    layer_fields = {"layer": 0}  # config fields holding decoder-layer indices: smallest legal value
    choices = {"pivot": PIVOTS, "greedy": GREEDY}
    name = "divprune"

    def __init__(self, pivot: str = "paper", greedy: str = "max_min_distance", **kwargs):
        super().__init__(**kwargs)
        if pivot not in PIVOTS:
            raise ValueError(f"prune.pivot must be one of {', '.join(PIVOTS)}, got {pivot!r}")
        if greedy not in GREEDY:
            raise ValueError(f"prune.greedy must be one of {', '.join(GREEDY)}, got {greedy!r}")
        self.greedy = greedy
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
        n = feats.shape[0]
        if self.greedy == "min_max_similarity" and self.pivot == "random":
            first = int(torch.randint(0, n, (), generator=self.generator))
            return min_max_similarity_greedy(feats, self.k(view), first)
        dist = cosine_distance(feats)
        if self.pivot == "paper":
            first = paper_pivot(dist)
        else:
            first = int(torch.randint(0, n, (1,), generator=self.generator))
        if self.greedy == "min_max_similarity":
            return min_max_similarity_greedy(feats, self.k(view), first)
        return max_min_greedy(dist, self.k(view), first)
