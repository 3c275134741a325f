"""Visual token index -> image rectangle (LLaDA-V base view + anyres grid), and masks of kept sets."""

from __future__ import annotations

import math

import numpy as np

from dvlm_exp.analysis.probes import _segments, kept_at


# ---------------------------------------------------------------------------------- image layout
def _bounds(n: int, lo: float, hi: float, scale: float, offset: float, limit: int) -> list[int]:
    """n + 1 cell edges from `lo` to `hi` (patch units), mapped to image pixels
    ((x * scale - offset), rounded, clipped to [0, limit]): monotone, so cells partition."""
    return [int(min(max(round((lo + i * (hi - lo) / n) * scale - offset), 0), limit)) for i in range(n + 1)]


def _grid_tokens(panel: int, rows: int, cols: int, xs: list[int], ys: list[int], newline: bool) -> list:
    out = []
    for i in range(rows):
        for j in range(cols):
            out.append([panel, i, j, xs[j], ys[i], xs[j + 1], ys[i + 1]])
        if newline:
            out.append(None)
    return out


def image_layout(model, images: list) -> dict:
    """Visual token index -> image rectangle for a LLaDA-V-style model (attributes `image_size`,
    `patches_per_side`, `grid_pinpoints`, `max_tiles`, `image_newline`).

    One image (anyres): P = pps^2 base tokens (the image stretched to a square: cell (r, c) is
    [c*W/pps, (c+1)*W/pps) x [r*H/pps, ...)), then the unpadded (possibly anyres_max-downscaled)
    tile grid row by row, each row followed by one newline token (no rectangle). Several images
    (pad mode): one base view of the image centred on a square canvas each.
    Returns {"n_tokens", "panels": [{"image", "name", "rows", "cols", "size"}], "tokens": [[panel,
    row, col, x0, y0, x1, y1] | None per visual token]} (pixel rectangles, x1/y1 exclusive).
    """
    from dvlm_exp.models import llava_image as li

    S = int(model.image_size)
    pps = int(model.patches_per_side)
    newline = getattr(model, "image_newline", None) is not None
    panels, tokens = [], []
    if len(images) == 1:
        W, H = images[0].size
        panels.append({"image": 0, "name": f"base {pps}x{pps}", "rows": pps, "cols": pps, "size": [W, H]})
        tokens += _grid_tokens(0, pps, pps, _bounds(pps, 0, pps, W / pps, 0, W), _bounds(pps, 0, pps, H / pps, 0, H), False)
        cols, rows = li.get_anyres_grid_shape((W, H), model.grid_pinpoints, S)
        gh, gw = rows * pps, cols * pps
        t, b, left, r = li.unpadded_shape(gh, gw, (W, H))
        th, tw = li.anyres_max_target_shape(b - t, r - left, model.max_tiles, pps)
        # the image's place on the padded canvas (llava_image._resize_and_pad arithmetic)
        cw, ch = cols * S, rows * S
        if cw / W < ch / H:
            nw, nh = cw, min(math.ceil(H * cw / W), ch)
        else:
            nw, nh = min(math.ceil(W * ch / H), cw), ch
        ox, oy = (cw - nw) // 2, (ch - nh) // 2
        px = S / pps  # canvas pixels per patch
        xs = _bounds(tw, left, r, px * W / nw, ox * W / nw, W)
        ys = _bounds(th, t, b, px * H / nh, oy * H / nh, H)
        panels.append({"image": 0, "name": f"anyres grid {th}x{tw}", "rows": th, "cols": tw, "size": [W, H]})
        tokens += _grid_tokens(1, th, tw, xs, ys, newline)
    else:
        for k, im in enumerate(images):
            W, H = im.size
            side = max(W, H)
            ox, oy = (side - W) // 2, (side - H) // 2
            panels.append({"image": k, "name": f"image {k} {pps}x{pps}", "rows": pps, "cols": pps, "size": [W, H]})
            tokens += _grid_tokens(k, pps, pps, _bounds(pps, 0, pps, side / pps, ox, W),
                                   _bounds(pps, 0, pps, side / pps, oy, H), False)
    return {"n_tokens": len(tokens), "panels": panels, "tokens": tokens}


def panel_grids(layout: dict, kept) -> list[np.ndarray]:
    """Per panel a [rows, cols] bool array: True at the cells of kept visual tokens."""
    grids = [np.zeros((p["rows"], p["cols"]), dtype=bool) for p in layout["panels"]]
    for i in kept:
        t = layout["tokens"][i]
        if t is not None:
            grids[t[0]][t[1], t[2]] = True
    return grids


def overlay_masks(layout: dict, kept) -> list[np.ndarray]:
    """Per panel a [H, W] bool pixel mask of the panel's image: True inside the rectangle of
    every kept visual token (newline tokens have none), False elsewhere."""
    masks = [np.zeros((p["size"][1], p["size"][0]), dtype=bool) for p in layout["panels"]]
    for i in kept:
        t = layout["tokens"][i]
        if t is not None:
            p, _, _, x0, y0, x1, y1 = t
            masks[p][y0:y1, x0:x1] = True
    return masks


def coverage_masks(layout: dict) -> list[np.ndarray]:
    """Pixels covered by some visual token of each panel (outside: letterbox padding)."""
    return overlay_masks(layout, range(layout["n_tokens"]))


def shade(mask: np.ndarray, cover: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """The RGBA layer drawn over a panel: black with `alpha` on covered pixels of dropped tokens,
    transparent on kept tokens and outside every token."""
    out = np.zeros(mask.shape + (4,))
    out[cover & ~mask] = (0, 0, 0, alpha)
    return out


def survival_maps(layout: dict, sample: dict, n_layers: int) -> list[np.ndarray]:
    """Per panel a [H, W] float map: the fraction of (step, layer) calls each token was alive in."""
    alive = np.zeros(layout["n_tokens"])
    total = 0
    for st in sorted({s[0] for s in _segments(sample)}):
        for layer in range(n_layers):
            idx = kept_at(sample, st, layer)
            if idx is not None:
                alive[idx] += 1
                total += 1
    maps = [np.full((p["size"][1], p["size"][0]), np.nan) for p in layout["panels"]]
    for i, t in enumerate(layout["tokens"]):
        if t is not None:
            p, _, _, x0, y0, x1, y1 = t
            maps[p][y0:y1, x0:x1] = alive[i] / max(total, 1)
    return maps
