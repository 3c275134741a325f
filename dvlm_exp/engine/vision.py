"""The vision tower's layer loop, for methods that act inside SigLIP (ToMe as the dMLLM study ran it).

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
`llava_arch.py` does: every view merged separately (one batch, the same r), projected, and the
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


@torch.no_grad()
def tower_image_features(model, images: list, method, square) -> tuple[list[torch.Tensor], dict]:
    """LLaDA-V-family images -> merged visual blocks (the port's layout) and what the tower ran.

    `square`: the model's pad-mode image -> square image (several images: one square view each)."""
    from dvlm_exp.models import llava_image

    vt = model.vision_tower
    S, pps = model.image_size, model.patches_per_side
    if len(images) == 1:
        px, size_wh = llava_image.process_image(images[0], model.grid_pinpoints, S)
        groups = [int(px.shape[0])]
        unpruned = llava_image.num_visual_tokens(size_wh, model.grid_pinpoints, image_size=S,
                                                 patches_per_side=pps, max_tiles=model.max_tiles)
    else:
        px = torch.stack([llava_image.siglip_preprocess(square(im.convert("RGB")), S) for im in images])
        groups = [1] * len(images)
        unpruned = len(images) * pps * pps
    x = px.to(device=model.device, dtype=vt.embeddings.patch_embedding.weight.dtype)
    run = run_siglip_layers(vt.embeddings, vt.encoder.layers, x, method)
    proj = model.mm_projector(run.features.to(model.mm_projector[0].weight.dtype))  # [V, n, d]
    blocks, start = [], 0
    for g in groups:
        blk = proj[start:start + g].reshape(-1, proj.shape[-1])
        if len(images) == 1 and g == 1 and "unpad" in str(model.config.get("mm_patch_merge_type", "")):
            blk = torch.cat([blk, model.image_newline.to(blk.dtype)[None]])
        blocks.append(blk)
        start += g
    info = {"views": int(px.shape[0]), "n_visual_unpruned": int(unpruned),
            "vision_layer_tokens": [list(t) for t in run.layer_tokens], "tower_sizes": run.sizes}
    return blocks, info
