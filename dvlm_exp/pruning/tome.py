"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023), on the LLM input.

The dMLLM study's port (methods.md §3.3) merges inside every SigLIP encoder layer. Our engine
does not run the vision tower layer by layer, so the same matching runs here on the visual
tokens at decoder layer K (default 0: the projected visual embeddings the LLM receives):

  round: split the current visual tokens alternately into A (even) and B (odd); match each A
         token to its most cosine-similar B token; merge the r A tokens with the strongest
         matches into their B token by a size-weighted average (sizes accumulate). Merged
         tokens keep B's place, so the order is preserved.
  repeat until k = round(ratio * N) visual tokens remain. r = ceil((N - k) / rounds), never
         more than half the current tokens (t // 2) nor more than t - k per round.

Similarity features: the hidden states of the visual tokens at layer K (at K = 0 the input
embeddings; the study and ToMe use the attention keys, which do not exist before layer 0),
updated after each round to the size-weighted averages. Ties: first B on equal similarity,
lower A index on equal match strength.

The result is ONE Decision: the survivors are kept, and every merged original token is folded
into its survivor with weight 1, so the survivor becomes the plain mean of its members (equal
to the size-weighted average of the rounds). The engine applies it to the hidden states and,
when decisions persist as state, to the input embeddings, which later steps then use.

Deviations from the study (also in conf/prune/tome.yaml): merging happens in the LLM input
instead of inside SigLIP, so no tower layer runs on merged tokens and there is no proportional
attention (log-size key bias; the study uses it only inside the tower, the LLM never sees
sizes); the metric is hidden states, not keys; all visual tokens of the request (views,
newline tokens) form one set instead of one set per 384px view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dvlm_exp.engine.state import Decision
from dvlm_exp.pruning.base import PruneMethod
from dvlm_exp.registry import PRUNERS


def bipartite_merge(feats: torch.Tensor, target: int, rounds: int = 26):
    """Repeated bipartite soft matching of `feats` [N, d] down to `target` tokens.

    Returns (keep, assign): `keep` sorted indices of the surviving original tokens; `assign`
    [N] the index into `keep` of the survivor each original token was merged into.
    """
    n = feats.shape[0]
    dev = feats.device
    target = max(1, min(int(target), n))
    x = feats.float().clone()
    size = torch.ones(n, device=dev)
    rep = torch.arange(n, device=dev)  # original index of each current token (its place)
    assign = torch.arange(n, device=dev)  # original token -> index of its current token
    r_fixed = max(1, math.ceil((n - target) / max(1, int(rounds))))
    while x.shape[0] > target:
        t = x.shape[0]
        r = min(r_fixed, t // 2, t - target)
        a = torch.arange(0, t, 2, device=dev)
        b = torch.arange(1, t, 2, device=dev)
        xn = F.normalize(x, dim=-1)
        sim = xn[a] @ xn[b].T  # [|A|, |B|]
        best = torch.argmax(sim, dim=1)
        strength = sim.gather(1, best[:, None])[:, 0]
        order = torch.sort(strength, descending=True, stable=True).indices
        src = a[order[:r]]  # merged A tokens (current indices)
        bj = best[order[:r]]  # their B tokens (indices into b)
        dst = b[bj]
        num = x[b] * size[b, None]
        den = size[b].clone()
        num.index_add_(0, bj, x[src] * size[src, None])
        den.index_add_(0, bj, size[src])
        x[b] = num / den[:, None]
        size[b] = den
        target_of = torch.arange(t, device=dev)
        target_of[src] = dst
        alive = torch.ones(t, dtype=torch.bool, device=dev)
        alive[src] = False
        new_index = torch.cumsum(alive.long(), 0) - 1
        assign = new_index[target_of[assign]]
        x, size, rep = x[alive], size[alive], rep[alive]
    return rep, assign


@PRUNERS.register("tome")
class ToMe(PruneMethod):
    layer_fields = {"layer": 0}  # config fields holding decoder-layer indices: smallest legal value
    name = "tome"

    def __init__(self, rounds: int = 26, **kwargs):
        super().__init__(**kwargs)
        if self.layer < 0:
            raise ValueError("prune.layer must be >= 0")
        if int(rounds) < 1:
            raise ValueError(f"prune.rounds must be >= 1, got {rounds}")
        self.rounds = int(rounds)

    def decide(self, view) -> Decision | None:
        if view.layer != self.layer or view.n_visual == 0:
            return None
        k = self.k(view)
        if k >= view.n_visual:
            return None  # nothing to merge: the forward is the unpruned one
        feats = view.hidden[0, view.visual_index]
        keep, assign = bipartite_merge(feats, k, self.rounds)
        n = feats.shape[0]
        merged = torch.ones(n, dtype=torch.bool, device=keep.device)
        merged[keep] = False
        src = torch.nonzero(merged).squeeze(1)
        return Decision(keep=keep, merge_src=src, merge_dst=assign[src],
                        merge_w=torch.ones(src.numel(), device=keep.device))
