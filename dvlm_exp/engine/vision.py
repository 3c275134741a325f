"""The vision path for methods that act before the LLM: the tower's layer loop with a merge inside
every SigLIP layer (ToMe as the dMLLM study ran it, `tower_stage == "siglip_layers"`), and the
tower features reduced against the question before the projector (TRIM, `tower_stage ==
"output"`, at the end of this file).

The model exposes its tower parts (`vision_tower.embeddings`, `vision_tower.encoder.layers`,
each a transformers `SiglipEncoderLayer` with `layer_norm1`, `self_attn.{q,k,v,out}_proj`,
`layer_norm2`, `mlp`) and its projector; this loop runs them when a method with
`tower_stage == "siglip_layers"` is given, and calls the method inside every layer:

  x = LN1(h); q, k, v = proj(x)
  h = h + out_proj(SDPA(q, k, v, bias))       bias = log(size) per key when the method asks for
                                              proportional attention (a float mask), else none
  h, size = method.tower_merge(h, k, size, r) the layer's keys (before the head split) are the metric
  h = h + MLP(LN2(h))                         LN2 in float32 and cast back, as the study's port does
                                              (identical in float32)

The features returned are the last layer's output (no post-LN: the LLaDA-V tower, like the port,
feeds the encoder output to the projector). Without such a method the model keeps its own path
(transformers' encoder, untouched): this loop is never entered.

`tower_image_features` turns images into the LLM's visual blocks the way the study's ToMe
`llava_arch.py` does (LLaDA-V's, and LaViDa's, whose `get_2dPool` line for images is commented
out in that port: the merged views are NOT pooled to 14x14, so a token count that is no longer a
square never has to be pooled): every view merged separately (one batch, the same r), projected, and the
views of an image concatenated in order (base view, then tiles), with no unpad, no anyres_max
downscale and no newline tokens; a lone view (an image that yields one view) gets the one trailing
`image_newline` of the spatial branch when the merge type says "unpad". Several images are one
square view each (the official "pad" eval), no newline (the port's non-list branch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOWER_STAGE = "siglip_layers"


@dataclass
class TowerRun:
    features: torch.Tensor  # [V, n, d_v] last layer's output
    sizes: torch.Tensor  # [V, n] float32: original patches folded into each token
    layer_tokens: list  # per layer: (tokens the attention ran on, tokens the MLP ran on)


@torch.no_grad()
def run_siglip_layers(embeddings, layers, pixel_values: torch.Tensor, method) -> TowerRun:
    """Embeddings -> every encoder layer, with the method's merge after each attention residual."""
    h = embeddings(pixel_values)
    V, n0, _ = h.shape
    sizes = torch.ones(V, n0, dtype=torch.float32, device=h.device)
    r = method.tower_r(n0, len(layers))
    record = []
    for layer in layers:
        at = layer.self_attn
        t = h.shape[1]
        x = layer.layer_norm1(h)
        q, k, v = at.q_proj(x), at.k_proj(x), at.v_proj(x)

        def heads(z):
            return z.view(V, t, at.num_heads, at.head_dim).transpose(1, 2)

        bias = None
        if method.proportional_attention:
            log_size = torch.log(sizes.clamp_min(torch.finfo(sizes.dtype).eps))
            bias = log_size.to(q.dtype)[:, None, None, :]  # key-side, broadcast over heads and queries
        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias, scale=at.scale)
        h = h + at.out_proj(o.transpose(1, 2).reshape(V, t, -1))
        h, sizes = method.tower_merge(h, k, sizes, r)
        record.append((t, h.shape[1]))
        ln = layer.layer_norm2
        x = F.layer_norm(h.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(h.dtype)
        h = h + layer.mlp(x)
    return TowerRun(h, sizes, record)


def vision_path_features(model, images: list, method, question: str | None, square) -> tuple[list[torch.Tensor], dict]:
    """The visual blocks for a method with `tower_stage` set (called from the model's image_features)."""
    if method.tower_stage == TOWER_STAGE:
        return tower_image_features(model, images, method, square)
    if method.tower_stage == "output":
        return trim_image_features(model, images, method, question, square)
    raise ValueError(f"prune={method.name}: tower stage {method.tower_stage!r} has no vision path in "
                     "dvlm_exp/engine/vision.py; use a decoder-layer method")


def _views(model, images: list, square) -> tuple[torch.Tensor, list[int], int]:
    """Pixel views [V,3,S,S], views per image, and the visual tokens the unpruned path would give:
    anyres for one image, one square (pad) view per image for several (the official eval)."""
    from dvlm_exp.models import llava_image

    S, pps = model.image_size, model.patches_per_side
    if len(images) == 1 and getattr(model, "anyres", True):
        px, size_wh = llava_image.process_image(images[0], model.grid_pinpoints, S)
        if hasattr(model, "num_image_tokens"):  # LaViDa: its unpruned path pools every view (14x14)
            unpruned = model.num_image_tokens(size_wh) if px.shape[0] > 1 else model.pooled_side ** 2 + 1
        else:
            unpruned = llava_image.num_visual_tokens(size_wh, model.grid_pinpoints, image_size=S,
                                                     patches_per_side=pps, max_tiles=model.max_tiles)
        return px, [int(px.shape[0])], int(unpruned)
    px = torch.stack([llava_image.siglip_preprocess(square(im.convert("RGB")), S) for im in images])
    return px, [1] * len(images), len(images) * pps * pps


@torch.no_grad()
def tower_image_features(model, images: list, method, square) -> tuple[list[torch.Tensor], dict]:
    """LLaDA-V / LaViDa images -> merged visual blocks (the port's layout) and what the tower ran.

    `square`: the model's pad-mode image -> square image (several images: one square view each)."""
    vt = model.vision_tower
    px, groups, unpruned = _views(model, images, square)
    x = px.to(device=model.device, dtype=vt.embeddings.patch_embedding.weight.dtype)
    run = run_siglip_layers(vt.embeddings, vt.encoder.layers, x, method)
    proj = model.mm_projector(run.features.to(model.mm_projector[0].weight.dtype))  # [V, n, d]
    blocks, start = [], 0
    for g in groups:
        blk = proj[start:start + g].reshape(-1, proj.shape[-1])
        lone_anyres_view = len(images) == 1 and g == 1 and getattr(model, "anyres", True)  # not a pad batch
        if lone_anyres_view and "unpad" in str(model.config.get("mm_patch_merge_type", "")):
            blk = torch.cat([blk, model.image_newline.to(blk.dtype)[None]])
        blocks.append(blk)
        start += g
    info = {"views": int(px.shape[0]), "n_visual_unpruned": int(unpruned),
            "vision_layer_tokens": [list(t) for t in run.layer_tokens], "tower_sizes": run.sizes}
    return blocks, info


# ----------------------------------------------------------------------------------- TRIM
# tower_stage "output" (dvlm_exp/pruning/trim.py): the tower's features at the port's layer, the
# method's per-view reduction against the question's SigLIP text embedding, then the projector.


def tower_layer_features(model, pixel_values: torch.Tensor, layer: int | None) -> torch.Tensor:
    """[V,3,S,S] -> tower hidden states [V, N, dv] of `layer` (an index into (embeddings, layer 1,
    ..., layer L) as `hidden_states[layer]` in the port's `feature_select`; None: the last layer,
    which is what LLaDA-V's unpruned path uses). No post_layernorm."""
    vt = model.vision_tower
    h = vt.embeddings(pixel_values.to(device=model.device, dtype=vt.embeddings.patch_embedding.weight.dtype))
    states = [h]
    for blk in vt.encoder.layers:
        h = blk(h, None)
        states.append(h)
    return states[-1 if layer is None else layer]


@torch.no_grad()
def trim_image_features(model, images: list, method, question: str | None, square) -> tuple[list[torch.Tensor], dict]:
    """One [n, d] block per image, as the port's tower + llava_arch give them to the LLM (`square`: the
    model's pad-to-square for several images). The port's LaViDa path does not pool the views, so the
    reduction and the cut are the same on both families; only the unpruned count (`_views`) differs."""
    from dvlm_exp.models.text_tower import DOWNLOAD_HINT

    tt = getattr(model, "text_tower", None)
    if tt is None:
        raise ValueError(f"prune={method.name} needs the SigLIP text tower: set model.text_tower_path "
                         f"({DOWNLOAD_HINT})")
    if question is None:
        raise ValueError(f"prune={method.name} needs the question text")
    px, groups, n_full = _views(model, images, square)
    layer = int(model.config.get("mm_vision_select_layer", -1)) if method.features == "select_layer" else None
    feats = tower_layer_features(model, px, layer)  # [V, N, dv]
    text = tt.encode(question, embedding=method.text_embedding, strip=method.text_strip)  # [1, D]
    if text.shape[-1] != feats.shape[-1]:
        raise ValueError(f"prune={method.name}: the text tower's embedding ({text.shape[-1]}) and the vision "
                         f"tower's features ({feats.shape[-1]}) differ in size; the port dots them directly")
    normed = model.vision_tower.post_layernorm(feats)
    padded, n_keep, kept = method.reduce(feats, normed, text)  # [V, N, dv], tokens per view, indices per view
    proj = model.mm_projector(padded.to(model.mm_projector[0].weight.dtype))  # the port projects all N rows
    blocks, v0 = [], 0
    for g in groups:
        views = range(v0, v0 + (1 if method.views == "first" else g))
        blocks.append(torch.cat([proj[v, :n_keep] for v in views]))
        v0 += g
    n_windows = len(tt.windows(question, strip=method.text_strip))
    info = {"views": int(px.shape[0]), "kept_indices": [k.tolist() for k in kept],
            "n_visual_full": int(n_full),
            "method_flops": tt.flops(n_windows)}
    return blocks, info
