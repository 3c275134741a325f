"""SparseVLM (Zhang et al., ICML 2025; arXiv 2410.04417; Gumpest/SparseVLMs) for diffusion and AR VLMs.

Text-guided, multi-layer pruning (methods.md §4.1; the dMLLM study's port, §3.3):

1. Raters, once per forward, from the input embeddings (`view.embeds0`): with V the visual
   rows and T every token after the image (in a dLLM that includes the response slots, masked
   or not, as in the study's LLaDA-V port), r = mean over visual tokens of softmax_T(V·Tᵀ);
   the raters are the T tokens with r above its mean. `query_set: text` uses all of T.
2. At every pruning layer L of `layers` (L = the first layer that sees the pruned sequence):
   the rater rows of layer L-1's attention (per-head softmax, then the head mean), averaged
   over the raters, give each current visual token its relevance; the top `budget(L)` stay.
   v2 (SparseVLM+) averages only over the `heads` heads whose rater->visual attention is
   largest (14 of 32 in the paper).
3. v1 recycling: of the tokens pruned at L, the top int(0.3·p)+1 by relevance are clustered
   with DPC-kNN (k = cluster count, ⌊m/10⌋+1 centres) on their hidden states, and each cluster
   becomes one token, the plain mean of its members. Expressed as a `Decision` merge: the
   cluster centre is kept and the other members fold into it with weight 1, so the merged
   token sits at the centre's place in the visual block. The original code appends the merged
   tokens after the kept visual tokens instead; with renumbered positions (v1's policy) that
   only reorders visual tokens among themselves: every text / response token gets the same
   position id as in the original. The visual count after L is budget(L) + clusters.
4. Positions: v1 renumbers (the original truncates `position_ids`), v2 keeps the original ids.
   The engine applies the policy (`position_ids` in conf/prune/sparsevlm.yaml; set `keep`
   with `version: v2`). See `default_position_ids`.

Budgets (`budget_counts`): the canonical knob `ratio` is the fraction of visual tokens kept.
  budgets      null: the published budget shape for the version (score.py's RETAIN_TOKN
               list whose RETAIN_TOKN/576 is nearest `ratio`; three layers) or a flat shape
               when `layers` does not have three entries; else a list of fractions of the
               original visual count, one per layer.
  ratio_target layer_average (default): the shape is scaled by one factor (entries capped at 1,
               water-filling) so the layer-averaged kept fraction (Σ_l kept_l / (T·N), layers
               before the first pruning layer at N, SparseVLM's "equivalent tokens") equals
               `ratio`; last: scaled so the last pruning layer keeps `ratio` (one layer: the
               study's FastV-like port); none: `budgets` taken as given, `ratio` ignored.
Counts are keep_count(N0, fraction, rounding) of the ORIGINAL visual count N0, capped at the
current count; a layer whose budget is not below the current count does nothing (the original
always drops one token there: min(budget, n-1)), so ratio=1.0 is an exact no-op.

Peer definitions (the dMLLM study's LLaDA-V port, LLaDA-V/eval/llava_sparsevlm/model/
language_model/: modeling_llada.py LLaDAModel.forward, scaled_dot_product_attention and
generate_with_embeds; score.py attn_postprocess_topk; utils.py cluster_and_merge), options:
  score           head_mean_softmax (default: per-head softmax, then the head mean) |
                  softmax_of_head_mean_logits (the port: softmax over keys of the head-MEAN logits,
                  no mask bias; v1 only)
  recycled_at     centre (default: a merged token sits at its cluster centre's place) |
                  after_kept (the port: the merged tokens, in cluster order, follow the kept
                  visual tokens; with renumbered positions the model sees them there)
  recycled_persist mean_embeds (default: a merged token persists as the mean of its members'
                  input embeddings) | none (the port: the persistent state keeps only the
                  budget's tokens, the merged ones live in the pruning forward only)
  density_ties    order (default: float64 distances, density ties broken by token order) |
                  noise (the port: float32 difference norms, density + 1e-6·U(0,1) drawn from the
                  method's generator, reseeded per sample like DivPrune's pivot: the port's
                  global-generator draw when both were seeded with the sample's seed)
The port's budget int(N·keep) is `rounding: floor`. Left out: its cluster mean divides by
(count + 1e-6), ours by count (a relative 1e-6/count on a merged token).

Deviations (documented in the yaml too): SparseVLM scores inside layer l and prunes that
layer's output, i.e. our L = l+1 (its [2, 6, 15] is our [3, 7, 16]; our default [2, 6, 15]
follows methods.md's budget table, "layers 0-1 at 576"); v2's RoPE "gravity" division of the
attention map is left out; by default (options above) DPC-kNN breaks density ties by token order instead of 1e-6 noise;
the cluster mean has no +1e-6 in its denominator.
"""

from __future__ import annotations

import torch

from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.state import Decision, Roles
from dvlm_exp.pruning.base import PruneMethod, keep_count, topk_sorted
from dvlm_exp.registry import PRUNERS

VERSIONS = ("v1", "v2")
QUERY_SETS = ("raters", "text")
RATIO_TARGETS = ("layer_average", "last", "none")
SCORES = ("head_mean_softmax", "softmax_of_head_mean_logits")
RECYCLED_AT = ("centre", "after_kept")
RECYCLED_PERSIST = ("mean_embeds", "none")
DENSITY_TIES = ("order", "noise")
DENSITY_NOISE = 1e-6  # the port's cluster_and_merge: density + rand * 1e-6

# Gumpest/SparseVLMs llava/model/language_model/score.py: RETAIN_TOKN -> kept tokens (of 576)
# from pruning layers 2, 6, 15 on (LLaVA-1.5-7B, 32 layers).
PUBLISHED_BUDGETS = {
    "v1": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
PUBLISHED_N = 576
PAPER_HEADS = (14, 32)  # v2: 14 of LLaVA-1.5-7B's 32 heads
RECYCLE_FRAC = 0.3  # v1: top 30% (+1) of the pruned tokens are recycled
CLUSTER_DIV = 10  # v1: ⌊m/10⌋+1 cluster centres


def published_shape(version: str, ratio: float) -> tuple[list[float], int]:
    """The published budget list (as fractions of 576) whose RETAIN_TOKN/576 is nearest `ratio`."""
    table = PUBLISHED_BUDGETS[version]
    retain = min(sorted(table, reverse=True), key=lambda t: abs(t / PUBLISHED_N - ratio))
    return [b / PUBLISHED_N for b in table[retain]], retain


def scale_to_average(shape: list[float], layers: list[int], n_layers: int, ratio: float) -> list[float]:
    """Fractions min(1, s·shape_i) with one factor s such that the layer-averaged kept fraction
    (L_1 + Σ_i span_i·f_i) / T equals `ratio` (span_i: layers from L_i to the next pruning layer).
    Below the reachable minimum L_1 / T every fraction is 0 (the counts floor at 1 token)."""
    if ratio >= 1.0:
        return [1.0] * len(shape)
    spans = [b - a for a, b in zip(layers, list(layers[1:]) + [n_layers])]
    fracs = [0.0] * len(shape)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(shape)) if i not in capped]
        if not free:
            return [1.0] * len(shape)
        budget = ratio * n_layers - layers[0] - sum(spans[i] for i in capped)
        denom = sum(spans[i] * shape[i] for i in free)
        s = max(0.0, budget / denom) if denom > 0 else 0.0
        over = [i for i in free if s * shape[i] >= 1.0 - 1e-12]
        if not over:
            for i in free:
                fracs[i] = s * shape[i]
            for i in capped:
                fracs[i] = 1.0
            return fracs
        capped.add(max(over, key=lambda i: shape[i]))


def port_distances(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j|| / √C in x's float32, as the port's cluster_and_merge computes it (the norm of
    the difference vectors), row blocks bounding the [b, m, C] difference tensor."""
    m, c_dim = x.shape
    step = max(1, (1 << 24) // max(1, m * c_dim))
    rows = [(x[i:i + step, None] - x[None]).norm(dim=-1, p=2) for i in range(0, m, step)]
    return torch.cat(rows) / (c_dim ** 0.5)


def dpc_knn_noise(x: torch.Tensor, n_clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN as the port runs it (utils.py cluster_and_merge): float32, density + `noise`
    [m] (1e-6·U(0,1)), strict `>` for "higher density", centres in torch.topk order of ρ·δ.
    Returns (centres [c], assign [m]) as `dpc_knn`."""
    x = x.float()
    dist = port_distances(x)
    near = torch.topk(dist, k=n_clusters, dim=-1, largest=False).values
    density = (-(near ** 2).mean(dim=-1)).exp() + noise.to(x.device, torch.float32)
    higher = density[None, :] > density[:, None]
    delta = torch.where(higher, dist, dist.max()).min(dim=-1).values
    centres = torch.topk(delta * density, k=n_clusters).indices
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return centres, assign


def dpc_knn(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering (SparseVLM's `cluster_and_merge`) of x [m, C].

    Distances d_ij = ||x_i - x_j|| / √C; density ρ_i = exp(-mean of d² over the k = n_clusters
    nearest tokens, itself included); δ_i = min distance to a token of higher density (ties:
    the earlier token counts as higher), or the largest distance overall for the densest;
    centres = the n_clusters largest ρ·δ (ties: earlier token); every token joins its nearest
    centre (ties: the first centre in that order), centres themselves. Returns (centres [c]
    indices into x in score order, assign [m] cluster index per token).
    """
    m, c_dim = x.shape
    x = x.double()  # near-duplicate patches (blank page regions) make densities close: float64
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / c_dim ** 0.5
    near = torch.topk(dist, k=n_clusters, dim=-1, largest=False).values
    density = torch.exp(-(near ** 2).mean(-1))
    idx = torch.arange(m, device=x.device)
    higher = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    dmax = dist.max()
    delta = torch.where(higher, dist, dmax).min(dim=-1).values
    score = delta * density
    centres = torch.sort(score, descending=True, stable=True).indices[:n_clusters]
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return centres, assign


@PRUNERS.register("sparsevlm")
class SparseVLM(PruneMethod):
    layer_fields = {"layers": 1}  # config fields holding decoder-layer indices: smallest legal value
    choices = {"version": VERSIONS, "query_set": QUERY_SETS, "ratio_target": RATIO_TARGETS, "score": SCORES,
               "recycled_at": RECYCLED_AT, "recycled_persist": RECYCLED_PERSIST, "density_ties": DENSITY_TIES}

    # v1 renumbers (truncated ids), v2 keeps the original ids (methods.md §0.4)
    requires = {"version": {"v1": {"position_ids": "renumber"}, "v2": {"position_ids": "keep"}}}
    name = "sparsevlm"
    needs_attention = True

    def __init__(self, layers=(2, 6, 15), version: str = "v1", query_set: str = "raters", budgets=None,
                 ratio_target: str = "layer_average", heads: int | None = None, recycle: bool | None = None,
                 score: str = "head_mean_softmax", recycled_at: str = "centre",
                 recycled_persist: str = "mean_embeds", density_ties: str = "order", **kwargs):
        layers = [int(x) for x in (layers if isinstance(layers, (list, tuple)) else [layers])]
        kwargs.pop("layer", None)
        super().__init__(layer=layers[0] if layers else 1, **kwargs)
        if not layers or any(x < 1 for x in layers) or layers != sorted(set(layers)):
            raise ValueError(f"prune.layers={layers} must be increasing decoder layers >= 1 (scores come from layer L-1)")
        if version not in VERSIONS:
            raise ValueError(f"prune.version must be one of {', '.join(VERSIONS)}, got {version!r}")
        if query_set not in QUERY_SETS:
            raise ValueError(f"prune.query_set must be one of {', '.join(QUERY_SETS)}, got {query_set!r}")
        if ratio_target not in RATIO_TARGETS:
            raise ValueError(f"prune.ratio_target must be one of {', '.join(RATIO_TARGETS)}, got {ratio_target!r}")
        if budgets is not None:
            budgets = [float(b) for b in budgets]
            if len(budgets) != len(layers) or any(not 0.0 < b for b in budgets):
                raise ValueError(f"prune.budgets={budgets} must hold one positive fraction per layer of {layers}")
            if ratio_target == "none" and any(b > 1.0 for b in budgets):
                raise ValueError(f"prune.budgets={budgets} with ratio_target=none are kept fractions: each in (0, 1]")
        elif ratio_target == "none":
            raise ValueError("prune.ratio_target=none takes the budgets as given: set prune.budgets")
        for field, value, allowed in (("score", score, SCORES), ("recycled_at", recycled_at, RECYCLED_AT),
                                      ("recycled_persist", recycled_persist, RECYCLED_PERSIST),
                                      ("density_ties", density_ties, DENSITY_TIES)):
            if value not in allowed:
                raise ValueError(f"prune.{field} must be one of {', '.join(allowed)}, got {value!r}")
        if version == "v2" and score != "head_mean_softmax":
            raise ValueError("prune.score=softmax_of_head_mean_logits is the v1 port's score: v2 chooses heads "
                             "from per-head probabilities (set prune.version=v1 or score=head_mean_softmax)")
        if heads is not None and int(heads) < 1:
            raise ValueError(f"prune.heads={heads} must be a positive head count or null")
        self.layers = layers
        self.version = version
        self.query_set = query_set
        self.budgets = budgets
        self.ratio_target = ratio_target
        self.heads = None if heads is None else int(heads)
        self.recycle = (version == "v1") if recycle is None else bool(recycle)
        self.score, self.recycled_at = score, recycled_at
        self.recycled_persist, self.density_ties = recycled_persist, density_ties
        self.generator = torch.Generator().manual_seed(self.seed)
        self._counts: dict[int, int] = {}
        self._rater_pos: torch.Tensor | None = None  # original positions of the raters

    def reseed(self, seed: int) -> None:
        """Per-sample seed for `density_ties: noise` (the generator calls this per request)."""
        self.generator.manual_seed(int(seed))

    @property
    def default_position_ids(self) -> str:
        """The paper's policy: v1 renumbers, v2 keeps the original ids."""
        return "renumber" if self.version == "v1" else "keep"

    # ----------------------------------------------------------------- budgets
    def budget_fractions(self, ratio: float, n_layers: int) -> list[float]:
        """Kept fraction of the original visual tokens from each pruning layer on."""
        if any(x >= n_layers for x in self.layers):
            raise ValueError(f"prune.layers={self.layers} must be < the model's {n_layers} decoder layers")
        if self.ratio_target == "none":
            return list(self.budgets)
        if self.budgets is not None:
            shape = list(self.budgets)
        elif len(self.layers) == 3:
            shape = published_shape(self.version, ratio)[0]
        else:
            shape = [1.0] * len(self.layers)
        if self.ratio_target == "last":
            s = ratio / shape[-1]
            return [min(1.0, s * b) for b in shape]
        return scale_to_average(shape, self.layers, n_layers, ratio)

    def budget_counts(self, n_visual0: int, ratio: float, n_layers: int) -> dict[int, int]:
        fr = self.budget_fractions(ratio, n_layers)
        return {L: keep_count(n_visual0, f, self.rounding) for L, f in zip(self.layers, fr)}

    def n_heads_kept(self, n_heads: int) -> int:
        if self.heads is not None:
            return min(self.heads, n_heads)
        return max(1, min(n_heads, round(n_heads * PAPER_HEADS[0] / PAPER_HEADS[1])))

    # ----------------------------------------------------------------- raters
    @staticmethod
    def rater_scores(embeds: torch.Tensor, roles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T indices, r over T): r = mean over visual rows of softmax over T of V·Tᵀ, where T is
        every token after the last visual token."""
        vis = torch.nonzero(roles == Roles.VISUAL).squeeze(1)
        after = torch.arange(roles.numel(), device=roles.device) > vis[-1]
        t_idx = torch.nonzero(after & (roles != Roles.VISUAL)).squeeze(1)
        e = embeds.float()
        r = torch.softmax(e[vis] @ e[t_idx].T, dim=-1).mean(0)
        return t_idx, r

    def begin_forward(self, view) -> None:
        self._counts, self._rater_pos = {}, None
        if view.n_visual == 0:
            return
        t_idx, r = self.rater_scores(view.embeds0, view.roles)
        if t_idx.numel() == 0:
            return
        if self.query_set == "raters":
            sel = r > r.mean()
            if sel.any():  # all equal: nobody is above the mean, every T token rates
                t_idx = t_idx[sel]
        self._rater_pos = view.positions[t_idx]
        self._counts = self.budget_counts(view.seq.n_visual0, view.ratio, view.n_layers)

    def rater_index(self, view) -> torch.Tensor:
        """The raters' indices in the current sequence (tracked by original position)."""
        return torch.nonzero(torch.isin(view.positions, self._rater_pos.to(view.positions.device))).squeeze(1)

    # ----------------------------------------------------------------- engine hooks
    def score_request(self, view) -> ScoreRequest | None:
        nxt = view.layer + 1
        if self._rater_pos is None or nxt not in self._counts or self._counts[nxt] >= view.n_visual:
            return None
        return ScoreRequest(self.rater_index(view), keep_heads=self.version == "v2",
                            aggregate="softmax_mean_logits" if self.score == "softmax_of_head_mean_logits"
                            else "mean_softmax")

    def relevance(self, view, req: ScoreRequest) -> torch.Tensor:
        """Relevance of each current visual token (head-mean rater->visual attention, mean over raters)."""
        vis = view.visual_index
        if self.version == "v1":
            return req.column_mean[vis]
        tv = req.heads[:, :, vis]  # [h, r, n_vis]
        top = torch.topk(tv.sum(dim=(1, 2)), self.n_heads_kept(tv.shape[0])).indices
        return tv[top].mean(dim=(0, 1))

    def decide(self, view) -> Decision | None:
        L = view.layer
        req = view.scores.get(L - 1)
        if L not in self._counts or req is None or view.n_visual == 0:
            return None
        n_vis = view.n_visual
        k = min(self._counts[L], n_vis)
        if k >= n_vis:
            return None
        rel = self.relevance(view, req)
        keep = topk_sorted(rel, k)
        if not self.recycle:
            return Decision(keep=keep)
        dropped = torch.ones(n_vis, dtype=torch.bool, device=rel.device)
        dropped[keep] = False
        pruned = torch.nonzero(dropped).squeeze(1)
        m = int(pruned.numel() * RECYCLE_FRAC) + 1
        rec = pruned[torch.sort(rel[pruned], descending=True, stable=True).indices[:m]]
        n_clusters = m // CLUSTER_DIV + 1
        hid = view.hidden[0, view.visual_index[rec]]
        if self.density_ties == "noise":
            noise = torch.rand(m, generator=self.generator) * DENSITY_NOISE
            centres, assign = dpc_knn_noise(hid, n_clusters, noise)
        else:
            centres, assign = dpc_knn(hid, n_clusters)
        centre_tok = rec[centres]
        members = torch.ones(m, dtype=torch.bool, device=rec.device)
        members[centres] = False
        src = rec[members]
        if self.recycled_at == "after_kept":  # unsorted keep: kept tokens, then the clusters in order
            keep_all = torch.cat([keep, centre_tok])
            dst = keep.numel() + assign[members]
            slots = keep.numel() + torch.arange(n_clusters, device=rec.device)
        else:
            keep_all = torch.sort(torch.cat([keep, centre_tok])).values
            dst = torch.searchsorted(keep_all, centre_tok[assign[members]])
            slots = torch.searchsorted(keep_all, centre_tok)
        return Decision(keep=keep_all, merge_src=src, merge_dst=dst,
                        merge_w=torch.ones(src.numel(), dtype=torch.float32),
                        transient=slots if self.recycled_persist == "none" else None)
