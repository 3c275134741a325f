"""prune=study_tome_lavida (ToMe inside every SigLIP layer, LaViDa) against a naive re-statement of the
study's LaViDa port, on a tiny LaViDa-Dream checkpoint (dvlm_exp/models/tiny_lavida.py).

The port (Yrdal3910/dMLLM-Visual-Token-Redundancy-Analysis @ 43849fe) cannot be run here (its `llava`
package imports are only partly published), so it is re-stated in plain torch:
  LaViDa/eval/llava_tome/model/multimodal_encoder/siglip_encoder.py
    SigLipEncoderLayer.forward   the LLaDA-V port's layer line for line (re-stated in
                                 tests/test_tome_tower.py `port_encoder_layer`, reused here)
    SigLipEncoder.forward        sizes start at 1, `tome_r` fixed per run (the preset's r_by_ratio)
    SigLipVisionTower.forward    features = hidden_states[-1] (no post-LN)
  LaViDa/eval/llava_tome/model/llava_arch.py prepare_inputs_labels_for_multimodal
                                 a list of images -> all views through tower + mm_projector in one
                                 batch; `get_2dPool` only for videos (`# ... or ALWASY_DO_2DPOOL` is
                                 commented out), so NO 27x27 -> 14x14 pooling; spatial merge: several
                                 views kept as [V, n, d] and flattened in view order (no unpad, no
                                 newline); a 4-D pad batch (several images) -> one flat view each
Our side: the engine's tower loop (dvlm_exp/engine/vision.py) through LaViDa's image_features, as
run.py composes prune=study_tome_lavida; generation with LaViDa-Dream's sampler (shifted logits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from dvlm_exp.decoding.generator import GenPreset, Generator
from dvlm_exp.models import llava_image
from dvlm_exp.models.llada_v import expand_to_square
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.reporting import flops
from dvlm_exp.schedules.first_step import FirstStep
from test_tome_tower import _linear, build_sequence, port_encoder_layer, rel_err

RATIOS = [0.25, 0.5]
GENS = [(4, 4, 2), (16, 8, 8)]  # the study's Table 2 short answers (sweeps/task/dream_*.yaml), and a longer one
SPEC = dict(num_attention_heads=4, num_key_value_heads=2, vision_layers=2)  # 2 tower layers: merges compound
QUESTION = "What is the total?"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from dvlm_exp.models.tiny_lavida import write_lavida_checkpoint

    return write_lavida_checkpoint(tmp_path_factory.mktemp("lavida_tome") / "dream", "dream", SPEC, seed=1)


@pytest.fixture(scope="module")
def model(ckpt):
    from dvlm_exp.models.lavida import LaViDaDream

    return LaViDaDream.from_pretrained(ckpt)


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMG = noise_image(800, 600, 3)  # anyres: base + 2x2 tiles = 5 views


def study_tome_lavida(ratio: float, **override):
    from omegaconf import OmegaConf

    from dvlm_exp.registry import PRUNERS
    from dvlm_exp.run.build import compose_config

    cfg = compose_config(["model=lavida_dream", "prune=study_tome_lavida", f"ratio={ratio}"])
    p = OmegaConf.to_container(cfg.prune, resolve=True)
    p.update(override)
    return PRUNERS.get(p.pop("name"))(ratio=ratio, seed=0, **p), p


# ---------------------------------------------------------------------------------- the port
def port_views(model, px: torch.Tensor, tome_r: int):
    """The port's tower on each view alone: (features, sizes) per view."""
    emb = model.vision_tower.embeddings
    out = []
    for v in range(px.shape[0]):
        p = F.conv2d(px[v:v + 1].float(), emb.patch_embedding.weight, emb.patch_embedding.bias,
                     stride=emb.patch_embedding.stride)
        h = p.flatten(2)[0].T + emb.position_embedding.weight
        sizes = torch.ones(h.shape[0])
        for layer in model.vision_tower.encoder.layers:
            h, sizes = port_encoder_layer(layer, h, sizes, tome_r)
        out.append((h, sizes))
    return out


def port_blocks(model, images: list, tome_r: int):
    """llava_arch's blocks for the LLM: one [n, d] per image, and the per-view (features, sizes)."""
    pr = model.mm_projector

    def project(h):
        return _linear(pr[2], F.gelu(_linear(pr[0], h)))

    if len(images) == 1:  # a list of anyres views
        px, _ = llava_image.process_image(images[0], model.grid_pinpoints, model.image_size)
        views = port_views(model, px, tome_r)
        tokens = [project(h) for h, _ in views]  # no get_2dPool for images in this port
        if len(tokens) == 1:  # the single-image branch: the view + image_newline ("unpad")
            return [torch.cat([tokens[0], model.image_newline[None]])], views
        return [torch.cat(tokens)], views  # several views: flattened in order, no newline
    blocks, views = [], []  # "pad": a 4-D batch, one square view per image, no newline
    for im in images:
        px = llava_image.siglip_preprocess(expand_to_square(im.convert("RGB")), model.image_size)[None]
        (h, s), = port_views(model, px, tome_r)
        blocks.append(project(h))
        views.append((h, s))
    return blocks, views


@pytest.fixture(scope="module")
def port(model):
    out = {}
    with torch.no_grad():
        for ratio in RATIOS:
            r = study_tome_lavida(ratio)[0].r  # the preset's table: 26 at keep 0.25, 25 at 0.5
            out[ratio] = port_blocks(model, [IMG], r)
    return out


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ratio", RATIOS)
def test_merged_views_and_layout_match_port(model, port, ratio):
    from dvlm_exp.engine.vision import run_siglip_layers

    method, _ = study_tome_lavida(ratio)
    assert method.r == {0.25: 26, 0.5: 25}[ratio]  # the port's note "729, 196: 25, 26, 27"
    (ref,), ref_views = port[ratio]
    px, _ = llava_image.process_image(IMG, model.grid_pinpoints, model.image_size)
    vt = model.vision_tower
    run = run_siglip_layers(vt.embeddings, vt.encoder.layers, px, method)
    assert px.shape[0] == 5 and run.features.shape[1] == 729 - 2 * method.r
    for v, (h, s) in enumerate(ref_views):  # which patches went where: sizes exactly
        assert run.sizes[v].tolist() == s.tolist()
        assert rel_err(run.features[v], h) < 1e-5
    blocks, info = model.image_features([IMG], tower=method)
    assert len(blocks) == 1 and blocks[0].shape == ref.shape == (5 * (729 - 2 * method.r), 32)
    assert rel_err(blocks[0], ref) < 1e-5
    unpruned, uinfo = model.image_features([IMG])  # LaViDa's own path: pooled 14x14 views, unpad, newlines
    assert info["n_visual_unpruned"] == unpruned[0].shape[0] == model.num_image_tokens(IMG.size)
    assert info["vision_layer_tokens"] == [[729, 729 - method.r], [729 - method.r, 729 - 2 * method.r]]


def test_several_images_one_flat_view_each(model):
    method, _ = study_tome_lavida(0.5)
    imgs = [noise_image(500, 300, 1), noise_image(300, 420, 2)]
    with torch.no_grad():
        ref, _ = port_blocks(model, imgs, method.r)
        blocks, info = model.image_features(imgs, tower=method)
    assert [b.shape for b in blocks] == [b.shape for b in ref] == [(729 - 50, 32)] * 2
    assert all(rel_err(b, r) < 1e-5 for b, r in zip(blocks, ref))
    assert info["n_visual_unpruned"] == 2 * 729


@pytest.mark.parametrize("gen", GENS, ids=lambda g: "{}-{}-{}".format(*g))
@pytest.mark.parametrize("ratio", RATIOS)
def test_generate_matches_port_pipeline(model, port, ratio, gen):
    """Output ids of prune=study_tome_lavida == LaViDa-Dream unpruned, fed the port's merged tokens."""
    preset = GenPreset(gen_length=gen[0], block_length=gen[1], steps=gen[2])
    ids = model.prompt_ids(QUESTION, 1)
    (ref_tokens,), _ = port[ratio]
    with torch.no_grad():
        ref = Generator(model, NoPruning(), FirstStep(), preset, position_ids="renumber")
        ref.recorder.start_sample()
        ref_ids, _ = ref.sampler.generate(ref.engine, build_sequence(model, ids, ref_tokens, gen[0]))
        method, p = study_tome_lavida(ratio)
        ours = Generator(model, method, FirstStep(), preset, position_ids=p["position_ids"])
        ours.generate(QUESTION, [IMG])
    rec = ours.recorder.current
    assert rec.n_visual == model.num_image_tokens(IMG.size)  # the record's baseline: LaViDa's unpruned count
    assert set(rec.kept_by_step_layer.values()) == {ref_tokens.shape[0]}  # the LLM saw the merged views only
    assert rec.output_ids == ref_ids and model.mask_id not in ref_ids


def test_vision_flops_follow_the_merged_tower(model):
    method, _ = study_tome_lavida(0.25)
    with FlopCounterMode(display=False) as fc:
        _, info = model.image_features([IMG], tower=method)
    ours = flops.vision_flops(info["views"], model.dims(), layer_tokens=info["vision_layer_tokens"])
    counted = fc.get_total_flops()
    assert abs(ours - counted) / counted < 0.01, (ours, counted)
    with FlopCounterMode(display=False) as fc0:
        model.image_features([IMG])
    base = flops.vision_flops(info["views"], model.dims())
    assert abs(base - fc0.get_total_flops()) / fc0.get_total_flops() < 0.01
    # on the tiny tower r = 26 of 729 saves less than the matching costs (|A| x |B| key dots): the counts
    # differ, and the formula follows both
    assert counted != fc0.get_total_flops()


@pytest.mark.parametrize("overrides,message", [
    (["prune=study_tome_lavida", "ratio=0.3"], "prune.r_by_ratio lists r for ratio 0.5, 0.25, 0.1 only, not ratio=0.3"),
    (["prune=study_tome_lavida", "ratio=0.5", "prune.r=5"], "set prune.r or prune.r_by_ratio, not both"),
    (["prune=study_tome_lavida", "ratio=0.5", "prune.r_by_ratio=null", "prune.r=300"], "prune.r=300 is too large"),
    (["prune=study_tome_lavida", "ratio=0.5", "schedule=start_frac"], "use schedule=first_step"),
    (["prune=study_trim"], "needs model.text_tower_path"),  # TRIM runs on LaViDa too, with its text tower
])
def test_bad_tower_input_refused_before_loading(ckpt, overrides, message, monkeypatch):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run import build, validate

    cfg = build.compose_config(["model=lavida_dream", f"model.path={ckpt}", "task=synth_docvqa", "limit=1"] + overrides)
    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate.check(cfg, data=False)


def test_study_tome_lavida_passes_validation(ckpt):
    from dvlm_exp.run import build, validate

    for ratio in (0.5, 0.25, 0.1):
        cfg = build.compose_config(["model=lavida_dream", f"model.path={ckpt}", "task=synth_docvqa", "limit=1",
                                    "prune=study_tome_lavida", f"ratio={ratio}"])
        validate.check(cfg, data=False)


def test_cli_study_tome_lavida_writes_merged_record(ckpt, tmp_path):
    """run.py end to end on the tiny LaViDa-Dream checkpoint: every view merged to 729 - 2 r tokens (no pooling)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, DVLM_OUTPUTS=str(tmp_path))
    r = subprocess.run([sys.executable, str(REPO / "run.py"), "model=lavida_dream", f"model.path={ckpt}",
                        "prune=study_tome_lavida", "ratio=0.5", "task=synth_docvqa", "limit=1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = list(tmp_path.glob("runs/*/*/results.json"))
    rec = json.loads(res.read_text())
    tok, ex = rec["tokens"], rec["flops"]["by_convention"]["exact"]
    assert rec["config"]["prune"]["where"] == "tower" and rec["prune_preset"]["preset"] == "study_tome_lavida"
    kept = tok["visual_kept_per_sample"][0]
    assert kept > 0 and kept % (729 - 2 * 25) == 0  # whole merged views, no 14x14 pooling, no newline
    assert kept != tok["visual_per_sample"][0]  # the baseline is LaViDa's unpruned (pooled) count
    assert 0 < ex["vision"] != ex["baseline_vision"] > 0
