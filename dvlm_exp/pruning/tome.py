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

`where: tower` is the study's port itself (LLaDA-V/eval/llava_tome/model/multimodal_encoder/
siglip_encoder.py, `SigLipEncoderLayer.forward`; layout from `llava_arch.py`): the engine's tower
loop (dvlm_exp/engine/vision.py) calls `tower_merge` inside every SigLIP encoder layer, after the
attention residual, with the layer's keys as the metric:
  A = even, B = odd tokens; keys L2-normalised; each A token's most similar B token (argmax);
  the min(r, |A|, |B|) A tokens with the strongest matches (torch.topk) merged into their B token
  as sum(size * h) / (sum(size) + eps) (float32, cast back), sizes summed; unmerged A tokens kept;
  order restored by original index; the MLP runs on the reduced set.
  r: `r` tokens per layer, or from the ratio r = round(P * (1 - ratio) / L) (P patches per view,
  L tower layers; methods.md §4.4: 729, 26 -> keep 0.5: 14, 0.25: 21, 0.1: 25). The port's own
  code hard-codes r = 24 (`tome_r=24` in `SigLipEncoder.forward`), i.e. prune.r=24.
  proportional attention: log(size) added to every key's logits (`proportional_attention`).
  `r_by_ratio` {"keep": r}: r per keep ratio, read from a table (the study's LaViDa port:
  LaViDa/eval/llava_tome/.../siglip_encoder.py `SigLipEncoder.forward` runs `tome_r=27` with the note
  "729, 196: 25, 26, 27", sweeps/prune/study_tome_lavida.yaml); a ratio not in the table is refused.
In that mode the method does nothing in the LLM (the model sees the merged views, laid out as
the port flattens them: no unpad, newlines or anyres_max downscale; positions 0..n-1).
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


WHERE = ("llm_input", "tower")


def merge_layer(h: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int):
    """One SigLIP layer's bipartite merge, batched over views (the port's rule, module docstring).

    h [V, t, d], metric [V, t, dk] (the layer's keys), sizes [V, t] float32 -> (h', sizes')."""
    V, t, d = h.shape
    a = torch.arange(0, t, 2, device=h.device)
    b = torch.arange(1, t, 2, device=h.device)
    m = min(int(r), a.numel(), b.numel())
    if m <= 0:
        return h, sizes
    key = F.normalize(metric, dim=-1)
    sim = key[:, a] @ key[:, b].transpose(1, 2)  # [V, |A|, |B|]
    best = sim.argmax(dim=-1)
    strength = sim.gather(-1, best[..., None])[..., 0]
    src = torch.topk(strength, k=m, dim=-1).indices  # [V, m] merged A tokens (indices into a)
    dst = best.gather(-1, src)  # their B tokens (indices into b)
    hA, hB, sA, sB = h[:, a], h[:, b], sizes[:, a], sizes[:, b]
    w = sA.gather(-1, src)
    num = sB[..., None] * hB
    num = num.scatter_add(1, dst[..., None].expand(-1, -1, d), hA.gather(1, src[..., None].expand(-1, -1, d)) * w[..., None])
    den = sB.scatter_add(1, dst, w)
    merged_b = (num / (den[..., None] + torch.finfo(den.dtype).eps)).to(h.dtype)
    keep_a = torch.ones(V, a.numel(), dtype=torch.bool, device=h.device)
    keep_a.scatter_(1, src, False)
    n_a = a.numel() - m
    place = torch.cat([a.expand(V, -1)[keep_a].view(V, n_a), b.expand(V, -1)], dim=1)
    order = torch.argsort(place, dim=1)
    feats = torch.cat([hA[keep_a].view(V, n_a, d), merged_b], dim=1)
    new_sizes = torch.cat([sA[keep_a].view(V, n_a), den], dim=1)
    return feats.gather(1, order[..., None].expand(-1, -1, d)), new_sizes.gather(1, order)


@PRUNERS.register("tome")
class ToMe(PruneMethod):
    layer_fields = {"layer": 0}  # config fields holding decoder-layer indices: smallest legal value
    choices = {"where": WHERE}
    # where=tower runs in the model's vision tower (dvlm_exp/run/validate.py: the model family
    # must have one, and r must fit it)
    tower_when = {"where": "tower"}
    name = "tome"

    def __init__(self, rounds: int = 26, where: str = "llm_input", r: int | None = None,
                 proportional_attention: bool = True, r_by_ratio: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if self.layer < 0:
            raise ValueError("prune.layer must be >= 0")
        if int(rounds) < 1:
            raise ValueError(f"prune.rounds must be >= 1, got {rounds}")
        if where not in WHERE:
            raise ValueError(f"prune.where must be one of {', '.join(WHERE)}, got {where!r}")
        if r is not None and (isinstance(r, bool) or int(r) < 0):
            raise ValueError(f"prune.r must be null (from the ratio) or an integer >= 0, got {r!r}")
        self.rounds = int(rounds)
        self.where = where
        self.r = None if r is None else int(r)
        self.r_by_ratio = None
        if r_by_ratio is not None:
            if r is not None:
                raise ValueError("set prune.r or prune.r_by_ratio, not both")
            self.r_by_ratio = {ratio_key(k): v for k, v in dict(r_by_ratio).items()}
            self.r = table_r(self.r_by_ratio, self.ratio)
        self.proportional_attention = bool(proportional_attention)
        if where == "tower":
            from dvlm_exp.engine.vision import TOWER_STAGE

            self.tower_stage = TOWER_STAGE

    # ------------------------------------------------------------ where=tower (engine/vision.py)
    def tower_r(self, n_tokens: int, n_layers: int) -> int:
        """Merges per tower layer: prune.r, or round(P * (1 - ratio) / L) (methods.md §4.4)."""
        return tower_r(self.r, self.ratio, n_tokens, n_layers)

    def tower_merge(self, h, metric, sizes, r):
        return merge_layer(h, metric, sizes, r)

    # ------------------------------------------------------------ where=llm_input
    def decide(self, view) -> Decision | None:
        if self.where == "tower" or view.layer != self.layer or view.n_visual == 0:
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


def tower_r(r: int | None, ratio: float, n_tokens: int, n_layers: int) -> int:
    if r is not None:
        return int(r)
    return max(0, round(n_tokens * (1.0 - float(ratio)) / max(1, int(n_layers))))


def ratio_key(ratio) -> str:
    """The key of a keep ratio in `r_by_ratio` ("0.5", "0.25", "0.1")."""
    return f"{float(ratio):g}"


def table_r(table: dict, ratio) -> int:
    """r for `ratio` from an r_by_ratio table {"keep": r}; a ratio it does not list is an error."""
    key = ratio_key(ratio)
    if key not in table:
        raise ValueError(f"prune.r_by_ratio lists r for ratio {', '.join(table)} only, not ratio={key}: "
                         f"use one of those ratios, or prune.r_by_ratio=null (r from the ratio)")
    r = table[key]
    if isinstance(r, bool) or int(r) < 0:
        raise ValueError(f"prune.r_by_ratio[{key}]={r!r} must be an integer >= 0")
    return int(r)


def tower_r_limit(n_tokens: int, n_layers: int) -> int:
    """Largest r every one of `n_layers` layers can merge in full (a layer merges at most half its
    tokens: r <= (n - l*r) // 2 for l = 0..L-1, i.e. r <= n // (L + 1))."""
    return n_tokens // (int(n_layers) + 1)
