"""Golden and unit tests for dvlm_exp.models.llava_image (LLaDA-V views, pixels, token packing)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDEN
from dvlm_exp.models import llava_image as L

CASES = ["case_500x300", "case_384x384"]
S = 384
PPS = 27



# 36 pin-points [384*i, 384*j], i, j in 1..6 (first element = width), as in models.md §1.6.
PINS_36 = [(S * i, S * j) for i in range(1, 7) for j in range(1, 7)]


@pytest.fixture(scope="module")
def config_pins():
    cfg = json.loads((GOLDEN / "checkpoint" / "config.json").read_text())
    return cfg["image_grid_pinpoints"]


def _expected(case):
    return json.loads((GOLDEN / case / "expected.json").read_text())


# --------------------------------------------------------------------------------------------
# Pin-points
# --------------------------------------------------------------------------------------------


def test_parse_grid_pinpoints_forms(config_pins):
    from_cfg = L.parse_grid_pinpoints(config_pins)
    assert from_cfg == PINS_36
    labels = ",".join(f"({i}x{j})" for i in range(1, 7) for j in range(1, 7))
    assert L.parse_grid_pinpoints(labels, image_size=S) == PINS_36
    # only the first and last label matter (official regex range expansion)
    assert L.parse_grid_pinpoints("(1x1),...,(6x6)", image_size=S) == PINS_36
    assert L.parse_grid_pinpoints("(1x2),(3x3)", image_size=10) == [(10, 20), (10, 30), (20, 20), (20, 30), (30, 20), (30, 30)]
    assert L.parse_grid_pinpoints("[[384, 768], [768, 384]]") == [(384, 768), (768, 384)]


def test_select_best_resolution_width_height_order():
    pins = [(384, 768), (768, 384)]
    assert L.select_best_resolution((500, 300), pins) == (768, 384)  # wide image -> wide canvas
    assert L.select_best_resolution((300, 500), pins) == (384, 768)
    # smallest covering canvas wins over larger covering ones
    assert L.select_best_resolution((500, 300), PINS_36) == (768, 384)
    assert L.get_anyres_grid_shape((500, 300), PINS_36) == (2, 1)
    assert L.get_anyres_grid_shape((300, 500), PINS_36) == (1, 2)


# --------------------------------------------------------------------------------------------
# Golden: views and pixel values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden_views_and_pixels(case, config_pins):
    exp = _expected(case)
    img = Image.open(GOLDEN / case / "image.png")
    img.load()
    assert list(img.size) == exp["image_size_wh"]

    views, info = L.anyres_views(img, config_pins)
    assert len(views) == exp["num_views"]
    assert list(info["best_resolution_wh"]) == exp["best_resolution_wh"]
    assert list(info["grid_w_h"]) == exp["grid_w_h"]
    for i, v in enumerate(views):
        ref = np.asarray(Image.open(GOLDEN / case / f"view_{i}.png").convert("RGB"))
        got = np.asarray(v.convert("RGB"))
        assert got.shape == ref.shape == (S, S, 3)
        assert np.array_equal(got, ref), f"view {i} differs in {int((got != ref).sum())} values"

    pv, wh = L.process_image(img, config_pins)
    pexp = exp["pixel_values"]
    assert list(pv.shape) == pexp["shape"]
    assert pv.dtype == torch.float32
    assert tuple(wh) == tuple(exp["image_size_wh"])
    raw = np.ascontiguousarray(pv.numpy()).astype("<f4", copy=False).tobytes()
    assert hashlib.sha256(raw).hexdigest() == pexp["sha256"]
    means = pv.flatten(1).mean(dim=1)
    stds = pv.flatten(1).std(dim=1)
    assert torch.allclose(means, torch.tensor(pexp["per_view_mean"]), atol=1e-6, rtol=0)
    assert torch.allclose(stds, torch.tensor(pexp["per_view_std"]), atol=1e-5, rtol=0)
    assert pv[0, 0, 0, :5].tolist() == pexp["view0_c0_row0_first5"]
    assert pv[-1, 2, 383, -5:].tolist() == pexp["view_last_c2_row383_last5"]

    # the stored views, processed alone, give the same pixel values
    alone = torch.stack([L.siglip_preprocess(Image.open(GOLDEN / case / f"view_{i}.png")) for i in range(len(views))])
    assert torch.equal(alone, pv)


# --------------------------------------------------------------------------------------------
# Golden: visual-token counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden_visual_token_counts(case, config_pins):
    exp = _expected(case)
    vt = exp["visual_tokens"]
    wh = tuple(exp["image_size_wh"])
    assert L.num_visual_tokens(wh, config_pins, patches_per_side=PPS) == vt["total"]

    n_views = exp["num_views"]
    C = 4
    feats = torch.randn(n_views, PPS * PPS, C, generator=torch.Generator().manual_seed(0))
    newline = torch.randn(C, generator=torch.Generator().manual_seed(1))
    out, info = L.pack_image_features(feats, wh, config_pins, patches_per_side=PPS, newline=newline)
    assert out.shape == (vt["total"], C)
    assert info["base"] == vt["base"]
    assert info["grid_rows"] == vt["grid_rows"]
    assert info["grid_cols"] == vt["grid_cols"]
    assert info["newline_tokens"] == vt["newline_tokens"]
    assert vt["base"] + vt["grid_rows"] * (vt["grid_cols"] + 1) == vt["total"]
    # newline rows sit exactly where expected
    start = vt["base"]
    is_nl = (out[start:] == newline).all(dim=1)
    nl_idx = torch.nonzero(is_nl).flatten().tolist()
    assert nl_idx == [r * (vt["grid_cols"] + 1) + vt["grid_cols"] for r in range(vt["grid_rows"])]


# models.md §1.6 worked table: (w, h) -> (grid cols, grid rows), (rows, cols) after unpad/resize, total
WORKED = [
    ((384, 384), (1, 1), (27, 27), 1485),
    ((640, 480), (2, 2), (40, 54), 2929),
    ((800, 600), (3, 2), (46, 62), 3627),
    ((1000, 1000), (3, 3), (54, 54), 3699),
    ((1920, 1080), (5, 3), (40, 72), 3649),
    ((1700, 2200), (5, 6), (61, 47), 3657),
    ((1000, 3000), (2, 6), (93, 31), 3705),
]


@pytest.mark.parametrize("wh, grid, rows_cols, total", WORKED)
def test_worked_token_table(wh, grid, rows_cols, total):
    assert L.get_anyres_grid_shape(wh, PINS_36) == grid
    assert L.num_visual_tokens(wh, PINS_36) == total
    cols, rows = grid
    C = 2
    feats = torch.zeros(1 + cols * rows, PPS * PPS, C)
    out, info = L.pack_image_features(feats, wh, PINS_36, newline=torch.ones(C))
    assert out.shape[0] == total
    assert (info["grid_rows"], info["grid_cols"]) == rows_cols
    assert info["newline_tokens"] == rows_cols[0]


def _ref_grid_rows_cols(wh, pins, pps=PPS, max_tiles=4, image_size=S):
    """Independent restatement of the official LLaDA-V rule (llava_arch.py, anyres_max_4):
    best pin-point (max effective area, then min waste), unpad_image cropping the letterbox
    symmetrically with floor(padding) (an odd difference keeps one extra row/column), then the
    anyres_max downscale only when sqrt(h*w / (N*pps*pps)) > 1.1, to int(h // times) x
    int(w // times) (float floor division), before the newline column is appended."""
    ow, oh = wh
    best, best_key = None, None
    for w, h in pins:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        key = (eff, -(w * h - eff))
        if best_key is None or key > best_key:  # first candidate wins exact ties
            best, best_key = (w, h), key
    rows, cols = best[1] // image_size * pps, best[0] // image_size * pps
    if ow / oh > cols / rows:
        pad = (rows - int(oh * (cols / ow))) // 2
        rows -= 2 * pad
    else:
        pad = (cols - int(ow * (rows / oh))) // 2
        cols -= 2 * pad
    if max_tiles is not None:
        times = math.sqrt(rows * cols / (max_tiles * pps * pps))
        if times > 1.1:
            rows, cols = int(rows // times), int(cols // times)
    return rows, cols


@pytest.mark.parametrize("h, w, want", [
    (54, 54, (54, 54)),      # times = 1: no downscale
    (135, 25, (135, 25)),    # times = sqrt(3375/2916) = 1.076 <= 1.1: no downscale
    (81, 81, (54, 54)),      # times = 1.5
    (162, 54, (93, 31)),     # times = sqrt(3) = 1.732: 162 // 1.732 = 93.53 -> 93 (floor, not round)
    (81, 162, (38, 76)),     # times = sqrt(4.5) = 2.121: 38.18 -> 38, 76.37 -> 76
    (60, 54, (60, 54)),      # times = sqrt(3240/2916) = 1.054: only a threshold of 1.0 would shrink it
])
def test_anyres_max_target_shape_rule(h, w, want):
    """The anyres_max_4 downscale against hand-computed values: the 1.1 threshold (not 1.0) and
    float floor division (not rounding)."""
    assert L.anyres_max_target_shape(h, w, 4, PPS) == want
    assert L.anyres_max_target_shape(h, w, None, PPS) == (h, w)  # max_tiles=None: plain spatial_unpad


def test_num_visual_tokens_matches_packing_many_sizes():
    """Token counts and packed lengths against the independent reference rule above (not against
    the module's own anyres_max_target_shape), for many image sizes, two patch grids, with and
    without the anyres_max_4 downscale."""
    rng = np.random.RandomState(1234)
    sizes = [tuple(int(x) for x in rng.randint(20, 4000, size=2)) for _ in range(60)]
    sizes += [(1, 1), (10, 3000), (3000, 10), (384, 385), (385, 384), (768, 384), (2304, 2304), (4000, 300)]
    sizes += [(300, 1571), (1571, 300), (500, 300), (1000, 3000)]  # times in (1, 1.1]; odd unpad; floor
    # (300, 1571): 1x5 tiles, 135x27 grid, width unpad int(300*135/1571)=25 -> 135x25, times 1.076: kept
    assert _ref_grid_rows_cols((300, 1571), PINS_36) == (135, 25)
    assert L.num_visual_tokens((300, 1571), PINS_36) == PPS * PPS + 135 * 26
    C = 1
    nl = torch.ones(C)
    for pps in (PPS, 5):
        for wh in sizes:
            cols, rows = L.get_anyres_grid_shape(wh, PINS_36)
            feats = torch.zeros(1 + cols * rows, pps * pps, C)
            for max_tiles in (4, None):
                ref_rows, ref_cols = _ref_grid_rows_cols(wh, PINS_36, pps=pps, max_tiles=max_tiles)
                n = L.num_visual_tokens(wh, PINS_36, patches_per_side=pps, max_tiles=max_tiles)
                assert n == pps * pps + ref_rows * (ref_cols + 1), (wh, pps, max_tiles)
                out, info = L.pack_image_features(feats, wh, PINS_36, patches_per_side=pps, newline=nl, max_tiles=max_tiles)
                assert out.shape[0] == n, (wh, pps, max_tiles)
                assert (info["grid_rows"], info["grid_cols"]) == (ref_rows, ref_cols), (wh, pps, max_tiles)
            # without a newline vector: no extra column
            out, info = L.pack_image_features(feats, wh, PINS_36, patches_per_side=pps, newline=None)
            assert info["newline_tokens"] == 0
            assert out.shape[0] == L.num_visual_tokens(wh, PINS_36, patches_per_side=pps, newline=False)


# --------------------------------------------------------------------------------------------
# Pack order
# --------------------------------------------------------------------------------------------


def _encoded_features(n_views, pps=PPS):
    """features[v, p] = (v, p // pps, p % pps) so each token says where it came from."""
    v = torch.arange(n_views).view(-1, 1).expand(n_views, pps * pps)
    p = torch.arange(pps * pps).view(1, -1).expand(n_views, pps * pps)
    return torch.stack([v, p // pps, p % pps], dim=-1).float()


def _expected_grid(cols, rows, keep_rows, keep_cols, pps=PPS):
    """Reference order built with plain loops over the global patch grid."""
    out = []
    for R in keep_rows:
        row = []
        for Cg in keep_cols:
            view = 1 + (R // pps) * cols + (Cg // pps)
            row.append((view, R % pps, Cg % pps))
        out.append(row)
    return out


@pytest.mark.parametrize(
    "wh, cols, rows, keep_rows, keep_cols",
    [
        # 500x300 on 768x384: width side unpad, new width int(500*27/300)=45, crop (54-45)//2=4 each side -> 46
        ((500, 300), 2, 1, range(0, 27), range(4, 50)),
        # 400x800 on 768x1152 (2 cols x 3 rows): new width int(400*81/800)=40, crop 7 each side
        ((400, 800), 2, 3, range(0, 81), range(7, 47)),
        # 1000x300 on 1152x384: height-side unpad, new height int(300*81/1000)=24, crop (27-24)//2=1
        # on each side -> 25 rows (odd difference keeps one extra row)
        ((1000, 300), 3, 1, None, None),
    ],
)
def test_pack_order(wh, cols, rows, keep_rows, keep_cols):
    assert L.get_anyres_grid_shape(wh, PINS_36) == (cols, rows)
    if keep_rows is None:
        # height-side case: compute the kept rows by hand from the official formula
        H, W = rows * PPS, cols * PPS
        assert wh[0] / wh[1] > W / H
        new_h = int(wh[1] * (W / wh[0]))
        pad = (H - new_h) // 2
        keep_rows, keep_cols = range(pad, H - pad), range(0, W)
        assert pad > 0
    n_views = 1 + cols * rows
    feats = _encoded_features(n_views)
    newline = torch.tensor([-1.0, -2.0, -3.0])
    out, info = L.pack_image_features(feats, wh, PINS_36, newline=newline, max_tiles=None)
    # no downscale is triggered for these sizes anyway
    out4, _ = L.pack_image_features(feats, wh, PINS_36, newline=newline, max_tiles=4)
    assert torch.equal(out, out4)

    assert torch.equal(out[: PPS * PPS], feats[0])  # base block first, no newline
    exp_grid = _expected_grid(cols, rows, keep_rows, keep_cols)
    assert (info["grid_rows"], info["grid_cols"]) == (len(keep_rows), len(keep_cols))
    grid = out[PPS * PPS :]
    width = len(keep_cols) + 1
    assert grid.shape[0] == len(keep_rows) * width
    for r, row in enumerate(exp_grid):
        got = grid[r * width : (r + 1) * width]
        assert got[:-1].tolist() == [list(map(float, t)) for t in row]
        assert torch.equal(got[-1], newline)


def test_unpad_500x300_symmetric_floor():
    t = torch.arange(27 * 54).view(1, 27, 54)
    u = L.unpad_image(t, (500, 300))
    assert u.shape == (1, 27, 46)
    assert torch.equal(u, t[:, :, 4:50])
    assert L.unpadded_shape(27, 54, (500, 300)) == (0, 27, 4, 50)


def test_single_view_returns_base_only():
    feats = _encoded_features(1)
    out, info = L.pack_image_features(feats, (384, 384), PINS_36, newline=torch.zeros(3))
    assert torch.equal(out, feats[0])
    assert info["newline_tokens"] == 0


def test_pack_rejects_wrong_view_count():
    with pytest.raises(ValueError):
        L.pack_image_features(torch.zeros(3, PPS * PPS, 2), (384, 384), PINS_36)


def test_anyres_max_downscale_is_bilinear_align_corners_false():
    # 1000x1000 -> 3x3 tiles -> 81x81 grid, times = sqrt(81*81/(4*729)) = 1.5 -> 54x54
    wh = (1000, 1000)
    cols, rows = 3, 3
    feats = _encoded_features(1 + cols * rows)
    # channel 0 := global row, channel 1 := global col (linear in both: bilinear reproduces it exactly)
    g = torch.empty_like(feats)
    for v in range(1, 1 + cols * rows):
        tr, tc = divmod(v - 1, cols)
        g[v, :, 0] = tr * PPS + feats[v, :, 1]
        g[v, :, 1] = tc * PPS + feats[v, :, 2]
        g[v, :, 2] = 7.0
    g[0] = feats[0]
    out, info = L.pack_image_features(g, wh, PINS_36, newline=None)
    assert (info["grid_rows"], info["grid_cols"]) == (54, 54)
    grid = out[PPS * PPS :].view(54, 54, 3)
    src = (torch.arange(54, dtype=torch.float32) + 0.5) * (81 / 54) - 0.5  # = 1.5 d + 0.25
    assert torch.allclose(grid[:, 0, 0], src, atol=1e-4)
    assert torch.allclose(grid[0, :, 1], src, atol=1e-4)
    assert torch.allclose(grid[..., 2], torch.full((54, 54), 7.0))


# --------------------------------------------------------------------------------------------
# SigLIP preprocessing beyond the golden (resize path, modes)
# --------------------------------------------------------------------------------------------


def test_siglip_preprocess_matches_transformers_helpers():
    tt = pytest.importorskip("transformers.image_transforms")
    from transformers.image_utils import ChannelDimension, PILImageResampling

    rng = np.random.RandomState(0)
    for shape in [(50, 70, 3), (400, 390, 3)]:
        arr = rng.randint(0, 256, shape).astype(np.uint8)
        img = Image.fromarray(arr)
        x = tt.resize(arr, size=(S, S), resample=PILImageResampling.BICUBIC, data_format=ChannelDimension.FIRST)
        x = tt.rescale(x, scale=1 / 255, data_format=ChannelDimension.FIRST)
        x = tt.normalize(x, mean=(0.5,) * 3, std=(0.5,) * 3, data_format=ChannelDimension.FIRST)
        got = L.siglip_preprocess(img)
        assert got.shape == (3, S, S) and got.dtype == torch.float32
        assert np.array_equal(got.numpy(), x.astype(np.float32))


def test_siglip_preprocess_converts_mode():
    arr = np.random.RandomState(3).randint(0, 256, (S, S)).astype(np.uint8)
    got = L.siglip_preprocess(Image.fromarray(arr, mode="L"))
    exp = ((torch.from_numpy(arr).double() / 255).float() - 0.5) / 0.5
    assert torch.equal(got, exp.expand(3, S, S))


# --------------------------------------------------------------------------------------------
# Video pooling
# --------------------------------------------------------------------------------------------


def test_pool_video_frame_features_shape_and_values():
    n_frames, C = 3, 4
    feats = torch.randn(n_frames, PPS * PPS, C, generator=torch.Generator().manual_seed(5))
    out = L.pool_video_frame_features(feats)
    assert out.shape == (n_frames, math.ceil(27 / 2) ** 2, C) == (n_frames, 196, C)

    # hand-computed output (0, 0): source coordinate (0 + 0.5) * 27/14 - 0.5 = 13/28 in both axes
    a = 13 / 28
    grid = feats.view(n_frames, PPS, PPS, C)
    exp00 = (
        (1 - a) * (1 - a) * grid[:, 0, 0]
        + (1 - a) * a * grid[:, 0, 1]
        + a * (1 - a) * grid[:, 1, 0]
        + a * a * grid[:, 1, 1]
    )
    assert torch.allclose(out[:, 0], exp00, atol=1e-5)

    # linear field: value = 100 * row + col is reproduced exactly at the source coordinates
    rows = torch.arange(PPS).view(PPS, 1).expand(PPS, PPS)
    cols = torch.arange(PPS).view(1, PPS).expand(PPS, PPS)
    lin = (100.0 * rows + cols).reshape(1, PPS * PPS, 1)
    pooled = L.pool_video_frame_features(lin).view(14, 14)
    src = (torch.arange(14, dtype=torch.float64) + 0.5) * 27 / 14 - 0.5
    exp = (100 * src.view(14, 1) + src.view(1, 14)).float()
    assert torch.allclose(pooled, exp, atol=1e-3)
    assert abs(pooled[1, 1].item() - 101 * (1.5 * 27 / 14 - 0.5)) < 1e-3  # 241.678...


@pytest.mark.parametrize("h, new_h, y0", [(300, 346, 19), (299, 345, 19)])
def test_anyres_views_letterbox_geometry(h, new_h, y0):
    # 1000xh -> canvas 1152x384 (3x1 tiles). Width fills: scale 1.152, height ceil(h * 1.152)
    # (300 -> ceil(345.6) = 346, not 345), pasted at y = (384 - new_h) // 2 (floor: 39 // 2 = 19)
    # on a black canvas; the base view is stretched.
    img = Image.new("RGB", (1000, h), (255, 255, 255))
    views, info = L.anyres_views(img, PINS_36)
    assert info == {"best_resolution_wh": (1152, 384), "grid_w_h": (3, 1)}
    assert len(views) == 4
    assert np.asarray(views[0]).min() == 255  # stretched, no padding
    for tile in views[1:]:
        a = np.asarray(tile)
        white_rows = np.nonzero((a == 255).all(axis=(1, 2)))[0]
        black_rows = np.nonzero((a == 0).all(axis=(1, 2)))[0]
        assert white_rows.tolist() == list(range(y0, y0 + new_h))
        assert black_rows.tolist() == list(range(0, y0)) + list(range(y0 + new_h, 384))
