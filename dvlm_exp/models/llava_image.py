"""LLaDA-V image path that needs no model weights: views, pixel values, feature packing.

Re-implementation (not a copy) of the official LLaDA-V behaviour, commit 2252769 of ML-GSAI/LLaDA-V:

* ``train/llava/mm_utils.py``: ``select_best_resolution``, ``resize_and_pad_image``,
  ``divide_to_patches``, ``get_anyres_image_grid_shape``, ``process_anyres_image`` (views and
  their order) and ``process_images``.
* ``train/llava/model/multimodal_encoder/siglip_encoder.py``: ``SigLipImageProcessor.preprocess``
  (convert RGB, PIL bicubic resize to 384x384, rescale 1/255, normalise with mean = std = 0.5), which
  calls the numpy helpers of ``transformers.image_transforms`` (4.40).
* ``train/llava/model/llava_arch.py``: ``unpad_image``, ``get_2dPool`` and the ``spatial_unpad`` +
  ``anyres_max_N`` branch of ``prepare_inputs_labels_for_multimodal``.

Everything uses PIL's (width, height) order, as the official code does (the transformers LLaVA
helpers use (height, width); ``image_processing_utils.select_best_resolution`` is not reused here).

Details of the official code that are easy to get wrong (all reproduced here):

1. Pixel numerics: transformers' ``rescale`` multiplies the **uint8** array by the Python float
   ``1/255`` in **float64** and only then casts to float32; ``normalize`` then computes
   ``(x - 0.5) / 0.5`` in float32. (For all 256 uint8 values this equals the float32 division
   ``u / 255``, but NOT the float32 product ``u * float32(1/255)``, which differs by 1 ULP for 126
   of the 256 values; we use the float64 route.) The golden pixel sha256 matches bit-for-bit.
2. Both PIL resizes in ``process_anyres_image`` (base view and the aspect-resize before padding) use
   PIL's *default* resample (bicubic for RGB; nearest for "1"/"P" images, which are only converted
   to RGB later by the SigLIP processor). The aspect-resize uses ``math.ceil`` for the scaled side,
   capped at the canvas size; paste offset is ``(canvas - new) // 2``.
3. The base view is the whole image *stretched* to 384x384 (the "FIXME ... resizes instead of pad"
   in the official code), not letterboxed.
4. ``unpad_image`` receives the ORIGINAL image size (w, h), truncates the kept side with ``int()``
   and removes ``(cur - new) // 2`` from both ends, so an odd difference keeps one extra row/column
   (500x300 on a 54-column grid: new width 45, 46 columns kept).
5. ``anyres_max_N`` downscale: ``times = sqrt(h*w / (N * 27**2))`` on the *unpadded* grid; only if
   ``times > 1.1`` it resizes to ``[int(h // times), int(w // times)]`` (float floor division),
   ``F.interpolate(mode="bilinear")`` with the default ``align_corners=False`` and no antialias;
   the newline column is appended afterwards. ``27`` is the tile side in patches (``unit``).
6. Base view: 729 tokens, no newline. If ``get_anyres_image_grid_shape`` raises, the official code
   silently falls back to a 2x2 grid (not reproduced: we raise instead).
7. A single-view input (V == 1) on the official list/5-D path would get the newline appended
   (730 tokens). That cannot happen with anyres (always base + >= 1 tile); the multi-image "pad"
   mode passes a 4-D tensor, which takes the plain path (729 flat tokens per image, no newline). We
   return the 729 base tokens for V == 1.
8. Video frames: ``get_2dPool`` with ``mm_spatial_pool_mode = "bilinear"`` is
   ``F.interpolate(size=[ceil(h/stride), ceil(w/stride)], mode="bilinear")`` (align_corners False),
   i.e. 27x27 -> 14x14 = 196 tokens per frame; it is not an average pool.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "parse_grid_pinpoints",
    "select_best_resolution",
    "get_anyres_grid_shape",
    "siglip_preprocess",
    "anyres_views",
    "process_image",
    "unpad_image",
    "unpadded_shape",
    "anyres_max_target_shape",
    "pack_image_features",
    "num_visual_tokens",
    "pool_video_frame_features",
]


# --------------------------------------------------------------------------------------------
# Pin-points and grid shape
# --------------------------------------------------------------------------------------------


def parse_grid_pinpoints(value: Any, image_size: int = 384) -> list[tuple[int, int]]:
    """Candidate canvas sizes as a list of (width, height) pixel pairs.

    Accepts the config's list of [w, h] pairs, the training-script string form
    ``"(1x1),...,(6x6)"`` (tile counts; expanded to the full rectangle from the first to the last
    pair, each multiplied by ``image_size``, first element = width), or a string holding a Python
    list literal of pairs.
    """
    if isinstance(value, str):
        if "x" in value:
            matches = re.findall(r"\((\d+)x(\d+)\)", value)
            if not matches:
                raise ValueError(f"cannot parse grid pinpoints {value!r}")
            start = tuple(map(int, matches[0]))
            end = tuple(map(int, matches[-1]))
            return [
                (i * image_size, j * image_size)
                for i in range(start[0], end[0] + 1)
                for j in range(start[1], end[1] + 1)
            ]
        value = ast.literal_eval(value)
    out = []
    for pair in value:
        w, h = pair
        out.append((int(w), int(h)))
    if not out:
        raise ValueError("empty grid pinpoints")
    return out


def select_best_resolution(
    original_size_wh: Sequence[int], possible_resolutions_wh: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Official LLaVA rule, (width, height) order: maximise the effective (downscaled, capped at
    original) area; ties broken by the smallest wasted area; first candidate wins exact ties."""
    ow, oh = original_size_wh
    best = None
    best_eff = 0
    best_waste = float("inf")
    for w, h in possible_resolutions_wh:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best_eff, best_waste, best = eff, waste, (int(w), int(h))
    if best is None:
        raise ValueError("no usable pin-point")
    return best


def _pinpoints(grid_pinpoints: Any, image_size: int) -> list[tuple[int, int]]:
    if isinstance(grid_pinpoints, list) and grid_pinpoints and isinstance(grid_pinpoints[0], tuple):
        return grid_pinpoints  # already parsed
    return parse_grid_pinpoints(grid_pinpoints, image_size)


def get_anyres_grid_shape(
    image_size_wh: Sequence[int], grid_pinpoints: Any, image_size: int = 384
) -> tuple[int, int]:
    """(cols, rows) of the tile grid, i.e. best resolution // image_size (official order)."""
    bw, bh = select_best_resolution(image_size_wh, _pinpoints(grid_pinpoints, image_size))
    return bw // image_size, bh // image_size


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def siglip_preprocess(
    img: Image.Image,
    image_size: int = 384,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """Official ``SigLipImageProcessor.preprocess`` for one PIL image -> float32 [3, S, S]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    # transformers' resize goes through PIL with resample=BICUBIC, reducing_gap=None; PIL returns a
    # copy when the size already matches.
    img = img.resize((image_size, image_size), resample=Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)  # H, W, 3
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # 3, H, W uint8
    # rescale: uint8 * (1/255) evaluated in float64, then cast to float32 (see module doc, note 1)
    x = (x.to(torch.float64) * (1 / 255)).to(torch.float32)
    m = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    return ((x - m) / s).contiguous()


def _resize_and_pad(img: Image.Image, target_wh: tuple[int, int]) -> Image.Image:
    ow, oh = img.size
    tw, th = target_wh
    scale_w = tw / ow
    scale_h = th / oh
    if scale_w < scale_h:
        nw = tw
        nh = min(math.ceil(oh * scale_w), th)
    else:
        nh = th
        nw = min(math.ceil(ow * scale_h), tw)
    resized = img.resize((nw, nh))  # PIL default resample, as in the official code
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def anyres_views(
    img: Image.Image, grid_pinpoints: Any, image_size: int = 384
) -> tuple[list[Image.Image], dict]:
    """Views of ``process_anyres_image`` in official order: [base (stretched), tiles row-major].

    Returns (views, info) with info = {"best_resolution_wh": (W, H), "grid_w_h": (cols, rows)}.
    """
    pins = _pinpoints(grid_pinpoints, image_size)
    best = select_best_resolution(img.size, pins)
    padded = _resize_and_pad(img, best)
    tiles = []
    pw, ph = padded.size
    for top in range(0, ph, image_size):
        for left in range(0, pw, image_size):
            tiles.append(padded.crop((left, top, left + image_size, top + image_size)))
    base = img.resize((image_size, image_size))  # PIL default resample, stretched
    info = {
        "best_resolution_wh": best,
        "grid_w_h": (best[0] // image_size, best[1] // image_size),
    }
    return [base] + tiles, info


def process_image(
    img: Image.Image, grid_pinpoints: Any, image_size: int = 384
) -> tuple[torch.Tensor, tuple[int, int]]:
    """anyres pixel values [V, 3, S, S] float32 and the original (width, height)."""
    views, _ = anyres_views(img, grid_pinpoints, image_size)
    pv = torch.stack([siglip_preprocess(v, image_size) for v in views], dim=0)
    return pv, (int(img.size[0]), int(img.size[1]))


# --------------------------------------------------------------------------------------------
# Feature packing (spatial_unpad + anyres_max_N)
# --------------------------------------------------------------------------------------------


def unpadded_shape(cur_h: int, cur_w: int, original_size_wh: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, bottom_exclusive, left, right_exclusive) kept by the official ``unpad_image``."""
    ow, oh = original_size_wh
    if ow / oh > cur_w / cur_h:
        new_h = int(oh * (cur_w / ow))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(ow * (cur_h / oh))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def unpad_image(tensor: torch.Tensor, original_size_wh: Sequence[int]) -> torch.Tensor:
    """Crop a [C, H, W] grid to the un-letterboxed region (official arithmetic)."""
    t, b, l, r = unpadded_shape(tensor.shape[1], tensor.shape[2], original_size_wh)
    return tensor[:, t:b, l:r]


def anyres_max_target_shape(h: int, w: int, max_tiles: int | None, unit: int) -> tuple[int, int]:
    """Grid size after the anyres_max_N downscale (unchanged when not triggered)."""
    if max_tiles is None:
        return h, w
    times = math.sqrt(h * w / (max_tiles * unit**2))
    if times > 1.1:
        return int(h // times), int(w // times)
    return h, w


def pack_image_features(
    features: torch.Tensor,
    image_size_wh: Sequence[int],
    grid_pinpoints: Any,
    image_size: int = 384,
    patches_per_side: int = 27,
    newline: torch.Tensor | None = None,
    max_tiles: int | None = 4,
) -> tuple[torch.Tensor, dict]:
    """Merge per-view features [V, P, C] (view 0 = base) into the image's token sequence.

    Output [N_vis, C]: P base tokens, then the (unpadded, possibly downscaled) tile grid row by row,
    each row followed by ``newline`` (skipped when ``newline`` is None). ``max_tiles=None`` disables
    the anyres_max downscale (plain ``spatial_unpad``).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [V, P, C], got {tuple(features.shape)}")
    V, P, C = features.shape
    pps = patches_per_side
    if P != pps * pps:
        raise ValueError(f"expected {pps * pps} patches per view, got {P}")
    base = features[0]
    if V == 1:
        info = {"base": P, "grid_rows": 0, "grid_cols": 0, "newline_tokens": 0, "grid_w_h": (0, 0)}
        return base, info
    cols, rows = get_anyres_grid_shape(image_size_wh, grid_pinpoints, image_size)
    if V - 1 != cols * rows:
        raise ValueError(f"{V - 1} tiles given but the grid for {tuple(image_size_wh)} is {cols}x{rows}")
    grid = features[1:].reshape(rows, cols, pps, pps, C)
    grid = grid.permute(4, 0, 2, 1, 3).reshape(C, rows * pps, cols * pps)
    grid = unpad_image(grid, image_size_wh)
    h, w = grid.shape[1:]
    th, tw = anyres_max_target_shape(h, w, max_tiles, pps)
    if (th, tw) != (h, w):
        grid = F.interpolate(grid[None], size=[th, tw], mode="bilinear")[0]
    n_newline = 0
    if newline is not None:
        nl = newline.to(dtype=grid.dtype, device=grid.device).reshape(C, 1, 1).expand(C, th, 1)
        grid = torch.cat([grid, nl], dim=-1)
        n_newline = th
    grid_tokens = grid.flatten(1, 2).transpose(0, 1)
    out = torch.cat([base, grid_tokens], dim=0)
    info = {
        "base": P,
        "grid_rows": th,
        "grid_cols": tw,
        "newline_tokens": n_newline,
        "grid_w_h": (cols, rows),
    }
    return out, info


def num_visual_tokens(
    image_size_wh: Sequence[int],
    grid_pinpoints: Any,
    image_size: int = 384,
    patches_per_side: int = 27,
    max_tiles: int | None = 4,
    newline: bool = True,
) -> int:
    """Visual-token count of one anyres image, from sizes alone (same arithmetic as packing)."""
    pps = patches_per_side
    cols, rows = get_anyres_grid_shape(image_size_wh, grid_pinpoints, image_size)
    t, b, l, r = unpadded_shape(rows * pps, cols * pps, image_size_wh)
    h, w = anyres_max_target_shape(b - t, r - l, max_tiles, pps)
    return pps * pps + h * (w + (1 if newline else 0))


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------


def pool_video_frame_features(
    features: torch.Tensor, patches_per_side: int = 27, stride: int = 2
) -> torch.Tensor:
    """Official ``get_2dPool`` in bilinear mode: [F, pps^2, C] -> [F, ceil(pps/s)^2, C]."""
    n_frames, n_tok, C = features.shape
    pps = patches_per_side
    if n_tok != pps * pps:
        raise ValueError(f"expected {pps * pps} tokens per frame, got {n_tok}")
    x = features.reshape(n_frames, pps, pps, C).permute(0, 3, 1, 2).contiguous()
    size = [math.ceil(pps / stride), math.ceil(pps / stride)]
    x = F.interpolate(x, size=size, mode="bilinear")
    return x.permute(0, 2, 3, 1).reshape(n_frames, -1, C)
