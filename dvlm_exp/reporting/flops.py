"""FLOPs counted from what ran (the recorder), under two named conventions.

`fastv_paper`: the FastV paper's per-layer `4nd² + 2n²d + 2ndm` (multiply-accumulates of an
  MHA layer with a 2-matrix FFN, decoder only), as used by FastV, DivPrune and the dMLLM study.
`exact`: FLOPs = 2 x MACs of every matmul that runs: Q/K/V/O with grouped KV heads,
  QKᵀ and A·V, SwiGLU gate/up/down, plus the LM head rows computed and the vision tower
  (patch conv, SigLIP layers, projector). Norms, RoPE and activations are not counted, as
  `torch.utils.flop_counter.FlopCounterMode` does not count them either.
The baseline of a run is the same forwards with no token dropped.
"""

from __future__ import annotations

CONVENTIONS = ("exact", "fastv_paper")


def layer_flops(n_q: int, n_k: int, dims: dict, convention: str = "exact") -> int:
    d, m = dims["d"], dims["m"]
    if convention == "fastv_paper":
        return 4 * n_q * d * d + 2 * n_q * n_k * d + 2 * n_q * d * m
    h, hkv, dh = dims["heads"], dims["kv_heads"], dims["head_dim"]
    proj = n_q * d * (h * dh) + 2 * n_q * d * (hkv * dh) + n_q * (h * dh) * d
    attn = 2 * n_q * n_k * (h * dh)
    ffn = 3 * n_q * d * m
    return 2 * (proj + attn + ffn)


def score_rows_flops(n_rows: int, n_keys: int, dims: dict) -> int:
    """Method overhead of one attention-score request: q·kᵀ for `n_rows` query rows against
    `n_keys` keys in every head (what `engine.attention.ScoreRequest.compute` records)."""
    return 2 * dims["heads"] * n_rows * n_keys * dims["head_dim"]


def vision_flops(views: int, dims: dict, n_tokens_projected: int | None = None,
                 layer_tokens: list | None = None) -> int:
    """SigLIP tower (conv patch embedding + layers) and the 2-layer projector, exact convention.

    `layer_tokens`: per tower layer (tokens its attention ran on, tokens its MLP ran on), as the
    recorder logs them for a method merging inside the tower (dvlm_exp/engine/vision.py); a layer
    that merged also pays its bipartite matching, |A| x |B| key dot products. None: the full tower."""
    if views == 0:
        return 0
    n, d, m = dims["vision_patches"], dims["vision_d"], dims["vision_m"]
    patch = 2 * n * d * 3 * dims["patch_size"] ** 2
    if not layer_tokens:
        layer_tokens = [(n, n)] * dims["vision_layers"]
    layers = 0
    for t, t_mlp in layer_tokens:
        layers += 2 * (4 * t * d * d + 2 * t * t * d + 2 * t_mlp * d * m)
        if t_mlp < t:
            layers += 2 * ((t + 1) // 2) * (t // 2) * d
    n_out = layer_tokens[-1][1] if layer_tokens else n
    proj = 2 * n_out * (dims["mm_hidden"] * dims["d"] + dims["d"] * dims["d"])
    return views * (patch + layers + proj)


def sample_flops(rec, dims: dict, convention: str = "exact") -> dict:
    """FLOPs of one SampleRecord and of its unpruned baseline."""
    T = dims["layers"]
    decoder = sum(c * layer_flops(nq, nk, dims, convention) for (nq, nk), c in rec.layer_calls.items())
    extra = getattr(rec, "baseline_visual_extra", 0)  # a tower method shortened the LLM's input
    base_decoder = sum(c * T * layer_flops(n + extra, n + extra, dims, convention)
                       for n, c in rec.baseline_forwards.items())
    ar_base = getattr(rec, "baseline_layer_calls", None)
    if ar_base:  # AR prefill + cached decode (engine/ar.py): the baseline is per layer call
        base_decoder = sum(c * layer_flops(nq, nk, dims, convention) for (nq, nk), c in ar_base.items())
    out = {"decoder": decoder, "baseline_decoder": base_decoder}
    if convention == "exact":
        head = 2 * rec.lm_head_rows * dims["d"] * dims["vocab"]
        base_head = 2 * rec.baseline_lm_head_rows * dims["d"] * dims["vocab"]
        vis = vision_flops(rec.vision_views, dims, layer_tokens=getattr(rec, "vision_layer_tokens", None))
        base_vis = vision_flops(rec.vision_views, dims)
        out.update(lm_head=head, vision=vis, baseline_vision=base_vis, scoring=rec.scoring_flops,
                   total=decoder + head + vis + rec.scoring_flops,
                   baseline_total=base_decoder + base_head + base_vis)
    else:
        out.update(total=decoder, baseline_total=base_decoder)
    return out


def summarize(samples: list, dims: dict) -> dict:
    """Run-level FLOPs: totals over samples for each convention, and the reduction."""
    result = {}
    for conv in CONVENTIONS:
        parts = [sample_flops(s, dims, conv) for s in samples]
        agg = {k: sum(p[k] for p in parts) for k in (parts[0] if parts else {"total": 0, "baseline_total": 0})}
        total, base = agg.get("total", 0), agg.get("baseline_total", 0)
        agg["reduction"] = (1.0 - total / base) if base else 0.0
        agg["ratio"] = (total / base) if base else 1.0
        result[conv] = agg
    exact = result["exact"]
    return {"total": exact["total"], "baseline_total": exact["baseline_total"], "reduction": exact["reduction"],
            "convention": "exact", "by_convention": result}


# ------------------------------------------------------------------ autoregressive (LLaVA baselines)
def ar_decode_flops_eq7(n: int, L: int, dims: dict) -> int:
    """The study's Eq. 7 (paper convention): decoding L tokens with a KV cache after an n-token
    prompt, `T·(4·L·d² + 2·L·d·m + d·L·(2n + L − 1))`: decode token i (0-based) attends to
    n + i keys. `dims["layers"]` is T."""
    T, d, m = dims["layers"], dims["d"], dims["m"]
    return T * (4 * L * d * d + 2 * L * d * m + d * L * (2 * n + L - 1))


def ar_flops_paper(prefill_lengths: list[int], L: int, dims: dict) -> int:
    """Prefill + cached decode, paper convention, from per-layer token counts.

    `prefill_lengths[l]`: tokens layer l ran in the prefill (= what it caches; n before the pruning
    layer, n̂ from it on). `L`: decode steps (tokens fed back). Decode step j = 1..L attends to the
    layer's cache plus the j tokens fed so far, i.e. Eq. 7 per layer with n = n_l + 1."""
    one = dict(dims, layers=1)
    return sum(layer_flops(n, n, dims, "fastv_paper") + ar_decode_flops_eq7(n + 1, L, one) for n in prefill_lengths)


def fastv_prefill_ratio(n: int, n_visual: int, K: int, R: float, dims: dict) -> float:
    """FastV paper's prefill FLOPs ratio: [K·f(n) + (T−K)·f(n̂)] / [T·f(n)], n̂ = n − round(R·N_vis),
    f = `layer_flops(·, ·, "fastv_paper")` (R: fraction of visual tokens dropped)."""
    T = dims["layers"]
    n_hat = n - round(R * n_visual)
    f = lambda x: layer_flops(x, x, dims, "fastv_paper")  # noqa: E731
    return (K * f(n) + (T - K) * f(n_hat)) / (T * f(n))
