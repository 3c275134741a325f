"""LLaDA-V video path: frame sampling, 2x2 bilinear pooling, newline placement, token counts,
the prompt, end-to-end generation on the tiny model (direct and through the lmms-eval adapter)
and FastV on video tokens.

Official behaviour (ML-GSAI/LLaDA-V): `llava_onevision_llada.py` samples
`np.linspace(0, total-1, max_frames_num=32, dtype=int)` frames, preprocesses them with the
SigLIP processor, puts ONE `<image>` before the question and passes modalities=["video"];
`llava_arch.py` pools every frame with `get_2dPool` (bilinear, stride 2: 27x27 -> 14x14) and,
for `mm_newline_position == "grid"`, appends `image_newline` after each of the 14 rows of
every frame.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvlm_exp.models import llava_image
from dvlm_exp.models.llada_v import (
    IMAGE_TOKEN_INDEX, VideoClip, load_video_frames, num_video_tokens, pack_video_features,
    sample_frame_indices,
)

POSITIONS = ("grid", "frame", "one_token", "no_token")


def hand_count(n_frames: int, position: str, merge: str = "spatial_unpad", pps: int = 27, stride: int = 2) -> int:
    s = -(-pps // stride)
    if merge == "flat":
        return n_frames * s * s
    return {"grid": n_frames * s * (s + 1), "frame": n_frames * (s * s + 1),
            "one_token": n_frames * s * s + ("unpad" in merge), "no_token": n_frames * s * s}[position]


# ----------------------------------------------------------------------------- counts & layout


@pytest.mark.parametrize("n_frames", [1, 2, 5, 8, 32])
@pytest.mark.parametrize("position", POSITIONS)
def test_token_count_matches_formula(n_frames, position):
    C = 3
    pooled = torch.randn(n_frames, 196, C)
    out = pack_video_features(pooled, torch.zeros(C), position, "spatial_unpad")
    assert out.shape == (num_video_tokens(n_frames, 27, 2, position), C)
    assert out.shape[0] == hand_count(n_frames, position)
    # "flat" merge type: no newline whatever the position
    assert pack_video_features(pooled, torch.zeros(C), position, "flat").shape[0] == n_frames * 196
    assert num_video_tokens(n_frames, 27, 2, position, "flat") == n_frames * 196


def test_token_count_known_values():
    assert num_video_tokens(1) == 210  # 14 rows x (14 + newline)
    assert num_video_tokens(32) == 6720
    assert num_video_tokens(8, stride=3) == 8 * 9 * 10
    assert num_video_tokens(4, newline_position="one_token", patch_merge_type="spatial") == 4 * 196


def _coded(n_frames: int, side: int) -> torch.Tensor:
    """[F, side*side, 3] features whose value is (frame, row, col)."""
    f, r, c = torch.meshgrid(torch.arange(n_frames), torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([f, r, c], dim=-1).reshape(n_frames, side * side, 3).float()


NEWLINE = torch.tensor([-1.0, -1.0, -1.0])


def _expected(n_frames: int, side: int, position: str) -> list[tuple]:
    out = []
    for f in range(n_frames):
        for r in range(side):
            for c in range(side):
                out.append((f, r, c))
            if position == "grid":
                out.append((-1, -1, -1))
        if position == "frame":
            out.append((-1, -1, -1))
    if position == "one_token":
        out.append((-1, -1, -1))
    return out


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("n_frames", [1, 3])
def test_newline_placement(position, n_frames):
    side = 14
    out = pack_video_features(_coded(n_frames, side), NEWLINE, position, "spatial_unpad")
    got = [tuple(int(v) for v in row) for row in out]
    assert got == _expected(n_frames, side, position)


def _official_grid(feat: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """The tensor ops of the official add_token_per_grid, written out independently."""
    n, t, C = feat.shape
    h = int(math.sqrt(t))
    x = feat.view(n, 1, h, h, C).permute(4, 0, 2, 1, 3).contiguous()
    x = x.flatten(1, 2).flatten(2, 3)  # C, n*h, h
    x = torch.cat([x, newline[:, None, None].expand(C, x.shape[1], 1)], dim=-1)
    return x.flatten(1, 2).transpose(0, 1)


def test_grid_equals_official_tensor_ops():
    feat = torch.randn(5, 196, 8)
    nl = torch.randn(8)
    torch.testing.assert_close(pack_video_features(feat, nl, "grid"), _official_grid(feat, nl), rtol=0, atol=0)


# ----------------------------------------------------------------------------- pooling


def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """Weights [n_out, n_in] of half-pixel (align_corners=False) linear resampling."""
    W = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        a = src - i0
        W[o, i0] += 1 - a
        W[o, i1] += a
    return W


def test_pooling_is_bilinear_to_ceil_half():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 27 * 27, 5, generator=g, dtype=torch.float64)
    pooled = llava_image.pool_video_frame_features(feats, 27, 2)
    assert pooled.shape == (3, 196, 5)
    # reference 1: F.interpolate on the [F, C, 27, 27] layout
    x = feats.reshape(3, 27, 27, 5).permute(0, 3, 1, 2)
    ref = F.interpolate(x, size=(14, 14), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(3, 196, 5)
    torch.testing.assert_close(pooled, ref, rtol=0, atol=0)
    # reference 2: separable numpy weights (independent of torch)
    W = _bilinear_1d(27, 14)
    grid = feats.reshape(3, 27, 27, 5).numpy()
    ref2 = np.einsum("ai,bj,fijc->fabc", W, W, grid).reshape(3, 196, 5)
    np.testing.assert_allclose(pooled.numpy(), ref2, rtol=1e-12, atol=1e-12)
    # not an average pool (which would give 13x13)
    assert F.avg_pool2d(x, 2).shape[-1] == 13


# ----------------------------------------------------------------------------- frame sampling


def test_sampling_indices_official_rule():
    assert sample_frame_indices(12, 8) == [0, 1, 3, 4, 6, 7, 9, 11]
    assert sample_frame_indices(100, 4) == [0, 33, 66, 99]
    # fewer frames than max_frames: always max_frames indices, with repeats (decord rule)
    idx = sample_frame_indices(8, 32)
    assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 7 and idx[:6] == [0, 0, 0, 0, 0, 1]
    for total, m in ((1, 5), (7, 3), (300, 32), (31, 32)):
        assert sample_frame_indices(total, m) == np.linspace(0, total - 1, m, dtype=int).tolist()
    with pytest.raises(ValueError):
        sample_frame_indices(0, 8)


def test_load_video_frames_picks_official_indices(tmp_path):
    from dvlm_exp.evaluation.data.synth_video import write_mp4

    n = 12
    levels = 16 + 18 * np.arange(n)  # frame i is uniform grey 16 + 18 i
    frames = np.broadcast_to(levels[:, None, None, None], (n, 32, 32, 3)).astype(np.uint8)
    path = write_mp4(tmp_path / "ramp.mp4", frames)
    for m in (8, 12, 20):
        got = load_video_frames(str(path), m)
        assert got.shape == (m, 32, 32, 3) and got.dtype == np.uint8
        decoded_idx = np.rint((got.reshape(m, -1).mean(1) - 16) / 18).astype(int).tolist()
        assert decoded_idx == sample_frame_indices(n, m)
    # same pixels as lmms-eval's read_video when no repeats are needed
    from lmms_eval.models.model_utils.load_video import read_video

    np.testing.assert_array_equal(load_video_frames(str(path), 8), read_video(str(path), num_frm=8))


def test_make_clip_is_deterministic(tmp_path):
    from dvlm_exp.evaluation.data.synth_video import make_clip

    d1 = make_clip(tmp_path / "a.mp4", seed=5, n_frames=10, size=64)
    d2 = make_clip(tmp_path / "b.mp4", seed=5, n_frames=10, size=64)
    assert d1 == d2 and d1.endswith(".") and "moves" in d1
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert make_clip(tmp_path / "c.mp4", seed=6, n_frames=10, size=64) != d1 or \
        (tmp_path / "c.mp4").read_bytes() != (tmp_path / "a.mp4").read_bytes()
    fr = load_video_frames(tmp_path / "a.mp4", 10)
    assert fr.shape == (10, 64, 64, 3)
    assert np.abs(fr[0].astype(int) - fr[-1].astype(int)).max() > 50  # something moved


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from dvlm_exp.evaluation.data.synth_video import make_clip

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    desc = make_clip(path, seed=1, n_frames=12, size=96)
    return str(path), desc


def test_video_features_tiny_model(tiny_model, clip):
    frames = load_video_frames(clip[0], 3)
    out = tiny_model.video_features(frames)
    assert tiny_model.video_newline_position == "grid"
    assert out.shape == (num_video_tokens(3), tiny_model.dims()["d"]) == (630, tiny_model.dims()["d"])
    # same result from a tensor and from a list of PIL images
    from PIL import Image

    torch.testing.assert_close(tiny_model.video_features(torch.from_numpy(frames)), out, rtol=0, atol=0)
    torch.testing.assert_close(tiny_model.video_features([Image.fromarray(f) for f in frames]), out, rtol=0, atol=0)
    # reference: per-frame image preprocessing -> tower -> projector -> interpolate -> grid newline
    px = torch.stack([llava_image.siglip_preprocess(Image.fromarray(f), 384) for f in frames])
    feats = tiny_model.encode_views(px)
    x = feats.reshape(3, 27, 27, -1).permute(0, 3, 1, 2)
    pooled = F.interpolate(x, size=(14, 14), mode="bilinear").permute(0, 2, 3, 1).reshape(3, 196, -1)
    torch.testing.assert_close(out, _official_grid(pooled, tiny_model.image_newline.detach()), rtol=0, atol=0)
    rows = torch.arange(3 * 14) * 15 + 14
    assert torch.equal(out[rows], tiny_model.image_newline.detach().expand(len(rows), -1))


def test_video_prompt_has_one_placeholder(tiny_model, clip):
    ids = tiny_model.prompt_ids("Describe the video.", n_images=1, think="no_think")
    assert sum(t == IMAGE_TOKEN_INDEX for t in ids) == 1
    seq, info = tiny_model.prepare(ids, [VideoClip(load_video_frames(clip[0], 2))], gen_length=4)
    assert info["n_visual"] == num_video_tokens(2) and info["views"] == 2
    seq2, _ = tiny_model.prepare(ids, [], gen_length=4, videos=[load_video_frames(clip[0], 2)])
    torch.testing.assert_close(seq.prompt_embeds, seq2.prompt_embeds, rtol=0, atol=0)
    with pytest.raises(ValueError):
        tiny_model.prepare(ids, [VideoClip(load_video_frames(clip[0], 2)), VideoClip(load_video_frames(clip[0], 2))], 4)


def _check_output(tiny_model, gen, text, n_frames):
    rec = gen.recorder.current
    assert isinstance(text, str)
    assert rec.n_visual == num_video_tokens(n_frames) == n_frames * 210
    assert rec.vision_views == n_frames
    assert len(rec.output_ids) > 0 and not set(rec.output_ids) & set(tiny_model.banned_ids)


def test_generate_from_video_path(tiny_model, clip, monkeypatch):
    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.pruning.none import NoPruning
    from dvlm_exp.schedules.first_step import FirstStep

    monkeypatch.setattr(tiny_model, "video_max_frames", 6)
    gen = Generator(tiny_model, NoPruning(), FirstStep(), GenPreset(gen_length=8, block_length=8, steps=4))
    text = gen.generate("What moves in the video?", [clip[0]])
    _check_output(tiny_model, gen, text, 6)


def test_lmms_adapter_video_request(tiny_model, clip):
    from lmms_eval.api.instance import Instance

    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.evaluation.lmms_adapter import DvlmLMM
    from dvlm_exp.pruning.none import NoPruning
    from dvlm_exp.schedules.first_step import FirstStep

    gen = Generator(tiny_model, NoPruning(), FirstStep(), GenPreset(gen_length=8, block_length=8, steps=4))
    lm = DvlmLMM(generator=gen, progress=False, max_frames_num=5)
    lm.task_dict = {"vid": {"test": [{"video": clip[0]}]}}
    req = Instance("generate_until", ("Describe the video.", {"until": ["\n\n"]}, lambda d: [d["video"]], 0, "vid", "test"),
                   idx=0, metadata={"task": "vid", "doc_id": 0, "repeats": 1})
    (text,) = [r.text for r in lm.generate_until([req])]
    _check_output(tiny_model, gen, text, 5)
    assert lm.predictions[-1]["n_visual"] == num_video_tokens(5)
    # official default when nothing overrides it: 32 frames
    assert DvlmLMM(generator=gen, progress=False).video_max_frames() == tiny_model.video_max_frames == 32


def test_fastv_prunes_video_tokens(tiny_model, clip):
    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.pruning.fastv import FastV
    from dvlm_exp.schedules.first_step import FirstStep

    gen = Generator(tiny_model, FastV(ratio=0.5, layer=2), FirstStep(), GenPreset(gen_length=8, block_length=8, steps=4))
    text = gen.generate("What moves in the video?", [VideoClip(load_video_frames(clip[0], 4))])
    rec = gen.recorder.current
    _check_output(tiny_model, gen, text, 4)
    n = rec.n_visual
    assert rec.kept_by_step_layer[(0, 1)] == n
    assert rec.kept_by_step_layer[(0, 2)] == round(n * 0.5) == 420
    assert rec.kept_by_step_layer[(3, 0)] == round(n * 0.5)


def test_undecodable_image_names_the_sample(tmp_path, monkeypatch):
    """A truncated image file fails with the task and doc id in the message. (Importing
    lmms-eval's task module sets PIL's LOAD_TRUNCATED_IMAGES for the whole process, which
    makes truncated files load padded; the test pins PIL's default.)"""
    import io

    from PIL import Image, ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)

    from dvlm_exp.evaluation.lmms_adapter import DvlmLMM

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    (tmp_path / "bad.png").write_bytes(buf.getvalue()[:60])
    broken = Image.open(tmp_path / "bad.png")
    lm = DvlmLMM.__new__(DvlmLMM)
    lm.max_frames_num = 4
    with pytest.raises(ValueError, match=r"docvqa_val doc_id=7: visual could not be decoded"):
        lm.load_visuals([broken], where="docvqa_val doc_id=7")
