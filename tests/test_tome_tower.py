"""prune=study_tome (ToMe inside every SigLIP layer) against a naive re-statement of the study's port.

The port (Yrdal3910/dMLLM-Visual-Token-Redundancy-Analysis @ 43849fe) cannot be run here (its
`llava` package imports are only partly published), so it is re-stated below, plain torch, one view
at a time, eager attention, loops over tokens:
  LLaDA-V/eval/llava_tome/model/multimodal_encoder/siglip_encoder.py
    SigLipEncoderLayer.forward  LN1 -> attention with log(token_size) added to every key's logits
                                (softmax in float32) -> residual; keys (k_proj output) L2-normalised;
                                A = even, B = odd tokens; each A's argmax-similar B; the
                                min(tome_r, |A|, |B|) strongest A merged into their B as
                                (s_B h_B + sum s_A h_A) / (s_B + sum s_A + eps); unmerged A kept;
                                original order restored; LN2 (float32) -> MLP -> residual
    SigLipEncoder.forward       sizes start at 1, every layer merges (tome_r fixed per run)
    SigLipVisionTower.forward   features = hidden_states[-1] (the last layer's output, no post-LN)
  LLaDA-V/eval/llava_tome/model/llava_arch.py prepare_inputs_labels_for_multimodal
                                all views of the image through the tower and mm_projector in one
                                batch; an image with several views (base + tiles) is flattened in
                                view order, with no unpad, no anyres_max downscale, no image_newline
Our side: the engine's tower loop (dvlm_exp/engine/vision.py) + ToMe(where=tower) as the preset
composes it (sweeps/prune/study_tome.yaml), r from the ratio (round(P (1 - ratio) / L)).
Images: the two golden LLaDA-V cases and test_study_ports' seeded portrait (3 and 2 views).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from conftest import REPO, golden_dir
from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig
from dvlm_exp.engine import Engine
from dvlm_exp.engine.state import Roles, Sequence
from dvlm_exp.models import llava_image
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.reporting import flops
from dvlm_exp.schedules.first_step import FirstStep

GENS = [(16, 8, 8), (8, 8, 4)]
RATIOS = [0.25, 0.5]
IMAGES = ["case_500x300", "case_384x384", "portrait_320x480"]
_cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
try:  # as tests/test_flops.py: torch has no formula for the CPU flash kernel
    @register_flop_formula(_cpu_sdpa)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)
except RuntimeError:
    pass


@pytest.fixture(scope="module")
def golden_model():
    from dvlm_exp.models.llada_v import LLaDAV

    return LLaDAV.from_pretrained(golden_dir() / "checkpoint", dtype="float32", device="cpu", load_tokenizer=False)


@pytest.fixture(scope="module")
def inputs():
    import numpy as np

    out = {}
    for case in ("case_500x300", "case_384x384"):
        d = golden_dir() / case
        out[case] = (json.loads((d / "input_ids.json").read_text()), Image.open(d / "image.png").convert("RGB"))
    rng = np.random.default_rng(0)  # test_study_ports' third image
    yy, xx = np.mgrid[0:480, 0:320]
    arr = np.stack([xx * 200 // 319, yy * 200 // 479, (xx + yy) % 160], -1) + rng.integers(0, 56, (480, 320, 3))
    out["portrait_320x480"] = (out["case_384x384"][0], Image.fromarray(arr.astype(np.uint8), "RGB"))
    return out


def study_tome(ratio: float, **override):
    """ToMe as run.py composes prune=study_tome."""
    from omegaconf import OmegaConf

    from dvlm_exp.registry import PRUNERS
    from dvlm_exp.run.build import compose_config

    cfg = compose_config(["prune=study_tome", f"ratio={ratio}"])
    p = OmegaConf.to_container(cfg.prune, resolve=True)
    p.update(override)
    return PRUNERS.get(p.pop("name"))(ratio=ratio, seed=0, **p), p


# ----------------------------------------------------------------------------------------------
# The port, re-stated naively (one view, eager, loops)

def _linear(lin, x):
    return x @ lin.weight.T + lin.bias


def port_encoder_layer(layer, h: torch.Tensor, sizes: torch.Tensor, tome_r: int):
    """SigLipEncoderLayer.forward of the port on one view: h [t, d], sizes [t] -> (h', sizes')."""
    at = layer.self_attn
    t, d = h.shape
    nh = at.config.num_attention_heads
    dh = d // nh
    ln1 = layer.layer_norm1
    x = F.layer_norm(h, (d,), ln1.weight, ln1.bias, ln1.eps)
    q, k, v = _linear(at.q_proj, x), _linear(at.k_proj, x), _linear(at.v_proj, x)
    bias = torch.log(sizes.clamp_min(torch.finfo(sizes.dtype).eps))
    out = torch.empty(t, d)
    for head in range(nh):
        c = slice(head * dh, (head + 1) * dh)
        w = (q[:, c] @ k[:, c].T) * dh ** -0.5 + bias[None, :]
        out[:, c] = torch.softmax(w, dim=-1, dtype=torch.float32) @ v[:, c]
    h = h + _linear(at.out_proj, out)
    key = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    A, B = list(range(0, t, 2)), list(range(1, t, 2))
    m = min(tome_r, len(A), len(B))
    if m > 0:
        sims = (key[A] @ key[B].T).tolist()  # cosine of every (A, B) pair
        match = []  # (strength, A slot, B slot): each A's first most similar B
        for i, row in enumerate(sims):
            j = max(range(len(row)), key=lambda c: (row[c], -c))
            match.append((row[j], i, j))
        chosen = sorted(match, key=lambda e: -e[0])[:m]
        num = {j: sizes[b] * h[b] for j, b in enumerate(B)}
        den = {j: sizes[b].clone() for j, b in enumerate(B)}
        for _, i, j in chosen:
            num[j] = num[j] + sizes[A[i]] * h[A[i]]
            den[j] = den[j] + sizes[A[i]]
        merged = {i for _, i, _ in chosen}
        rows = [(a, h[a], sizes[a]) for i, a in enumerate(A) if i not in merged]
        rows += [(b, num[j] / (den[j] + torch.finfo(torch.float32).eps), den[j]) for j, b in enumerate(B)]
        rows.sort(key=lambda e: e[0])
        h = torch.stack([r[1] for r in rows])
        sizes = torch.stack([r[2] for r in rows])
    ln2 = layer.layer_norm2
    x = F.layer_norm(h, (d,), ln2.weight, ln2.bias, ln2.eps)
    mlp = layer.mlp
    return h + _linear(mlp.fc2, F.gelu(_linear(mlp.fc1, x), approximate="tanh")), sizes


def port_image_tokens(model, img, tome_r: int):
    """The port's tower + llava_arch flatten for one image: (visual tokens [N, d], per-view features, sizes)."""
    px, _ = llava_image.process_image(img, model.grid_pinpoints, model.image_size)
    emb = model.vision_tower.embeddings
    views, view_sizes = [], []
    for v in range(px.shape[0]):
        p = F.conv2d(px[v:v + 1].float(), emb.patch_embedding.weight, emb.patch_embedding.bias,
                     stride=emb.patch_embedding.stride)
        h = p.flatten(2)[0].T + emb.position_embedding.weight
        sizes = torch.ones(h.shape[0])
        for layer in model.vision_tower.encoder.layers:
            h, sizes = port_encoder_layer(layer, h, sizes, tome_r)
        views.append(h)
        view_sizes.append(sizes)
    pr = model.mm_projector
    tokens = [_linear(pr[2], F.gelu(_linear(pr[0], h))) for h in views]
    assert len(tokens) > 1  # anyres: base + tiles -> the port's multi-view branch (no newline)
    return torch.cat(tokens), views, view_sizes


@pytest.fixture(scope="module")
def port(golden_model, inputs):
    """(image, ratio) -> the port's outputs with r chosen as the preset does."""
    out = {}
    L = len(golden_model.vision_tower.encoder.layers)
    P = golden_model.patches_per_side ** 2
    with torch.no_grad():
        for name in IMAGES:
            for ratio in RATIOS:
                r = round(P * (1 - ratio) / L)
                out[name, ratio] = port_image_tokens(golden_model, inputs[name][1], r)
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("image", IMAGES)
def test_tower_merge_matches_port(golden_model, inputs, port, image, ratio):
    from dvlm_exp.engine.vision import run_siglip_layers

    method, _ = study_tome(ratio)
    img = inputs[image][1]
    ref_tokens, ref_views, ref_sizes = port[image, ratio]
    px, _ = llava_image.process_image(img, golden_model.grid_pinpoints, golden_model.image_size)
    vt = golden_model.vision_tower
    run = run_siglip_layers(vt.embeddings, vt.encoder.layers, px, method)
    assert run.features.shape[1] == ref_views[0].shape[0]
    for v in range(px.shape[0]):  # which patches went where: sizes exactly, features to float noise
        assert run.sizes[v].tolist() == ref_sizes[v].tolist()
        assert rel_err(run.features[v], ref_views[v]) < 1e-5
    blocks, info = golden_model.image_features([img], tower=method)
    assert len(blocks) == 1 and blocks[0].shape == ref_tokens.shape
    assert rel_err(blocks[0], ref_tokens) < 1e-5
    n = ref_views[0].shape[0]
    assert info["vision_layer_tokens"][-1][1] == n and info["views"] == px.shape[0]
    # keep 0.5 on the 2-layer tiny tower: r = 182, 729 -> 547 -> 365 per view
    if ratio == 0.5:
        assert n == 365


def build_sequence(model, ids, block, gen_length):
    """model.prepare's splice for one image block given from outside (the naive pipeline)."""
    pieces, roles, text = [], [], []
    for t in ids + [None]:
        if t is None or t == -200:
            if text:
                pieces.append(model.embed_tokens(torch.tensor(text)))
                roles.append(torch.full((len(text),), Roles.TEXT, dtype=torch.int8))
                text = []
            if t == -200:
                pieces.append(block)
                roles.append(torch.full((block.shape[0],), Roles.VISUAL, dtype=torch.int8))
        else:
            text.append(t)
    emb = torch.cat(pieces)
    return Sequence(prompt_embeds=emb, roles=torch.cat(roles), positions=torch.arange(emb.shape[0]),
                    response_ids=torch.full((gen_length,), model.mask_id, dtype=torch.long),
                    prompt_len0=emb.shape[0], mask_id=model.mask_id)


def generate(model, seq, method, gen, block, steps):
    eng = Engine(model, method, FirstStep(), position_ids="renumber")
    eng.recorder.start_sample()
    sampler = MaskedDiffusionSampler(SamplerConfig(gen_length=gen, block_length=block, steps=steps), model.banned_ids)
    out, _ = sampler.generate(eng, seq)
    return out, eng.recorder.current


@pytest.mark.parametrize("gen", GENS, ids=lambda g: "{}-{}-{}".format(*g))
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("image", IMAGES)
def test_generate_matches_port_pipeline(golden_model, inputs, port, image, ratio, gen):
    """Output ids of prune=study_tome == the unpruned engine fed the port's merged tokens."""
    ids, img = inputs[image]
    ref_tokens = port[image, ratio][0]
    with torch.no_grad():
        ref_ids, _ = generate(golden_model, build_sequence(golden_model, ids, ref_tokens, gen[0]), NoPruning(), *gen)
        method, _ = study_tome(ratio)
        seq, info = golden_model.prepare(ids, [img], gen_length=gen[0], tower=method)
        ours, rec = generate(golden_model, seq, method, *gen)
    assert info["n_visual"] == ref_tokens.shape[0]
    assert set(rec.kept_by_step_layer.values()) == {ref_tokens.shape[0]}  # the LLM saw the merged views only
    assert ours == ref_ids


def test_r_zero_runs_the_unmerged_tower(golden_model, inputs):
    """Our tower loop with nothing merged is the model's own tower (so the loop runs the same layers);
    without a tower method the model's path is untouched (tests/test_golden_llada_v.py, bit-exact)."""
    method, _ = study_tome(0.5, r=0)
    img = inputs["case_500x300"][1]
    px, _ = llava_image.process_image(img, golden_model.grid_pinpoints, golden_model.image_size)
    blocks, info = golden_model.image_features([img], tower=method)
    own = golden_model.encode_views(px).reshape(-1, blocks[0].shape[1])
    assert rel_err(blocks[0], own) < 1e-5
    assert info["vision_layer_tokens"] == [[729, 729]] * 2
    plain, _ = golden_model.image_features([img])  # no method: the packed official layout
    assert plain[0].shape[0] == info["n_visual_unpruned"]


@pytest.mark.parametrize("ratio", RATIOS)
def test_vision_flops_follow_the_merged_tower(golden_model, inputs, ratio):
    method, _ = study_tome(ratio)
    img = inputs["portrait_320x480"][1]
    with FlopCounterMode(display=False) as fc:
        _, info = golden_model.image_features([img], tower=method)
    ours = flops.vision_flops(info["views"], golden_model.dims(), layer_tokens=info["vision_layer_tokens"])
    counted = fc.get_total_flops()
    assert abs(ours - counted) / counted < 0.01, (ours, counted)
    with FlopCounterMode(display=False) as fc0:
        golden_model.image_features([img])
    assert abs(flops.vision_flops(info["views"], golden_model.dims()) - fc0.get_total_flops()) / fc0.get_total_flops() < 0.01
    assert ours < fc0.get_total_flops()


def test_cli_study_tome_writes_merged_record(tmp_path):
    env = dict(os.environ, DVLM_OUTPUTS=str(tmp_path))
    r = subprocess.run([sys.executable, str(REPO / "run.py"), "model=tiny", "prune=study_tome", "limit=1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = list(tmp_path.glob("runs/*/*/results.json"))
    rec = json.loads(res.read_text())
    tok, ex = rec["tokens"], rec["flops"]["by_convention"]["exact"]
    assert rec["config"]["prune"]["where"] == "tower"
    assert 0 < tok["visual_kept_per_sample"][0] < tok["visual_per_sample"][0]
    assert 0 < ex["vision"] < ex["baseline_vision"]
    assert ex["decoder"] < ex["baseline_decoder"]


@pytest.mark.parametrize("overrides,message", [
    (["model=tiny", "prune=study_tome", "prune.r=300"], "prune.r=300 is too large for model=tiny's tower"),
    (["model=tiny_llava", "prune=study_tome"], "has no tower path"),
    (["model=tiny", "prune=tome", "prune.where=inside"], "prune.where=inside must be one of llm_input, tower"),
    (["model=tiny", "prune=study_tome", "schedule=start_frac"], "use schedule=first_step"),
])
def test_bad_tower_input_refused_before_loading(overrides, message, monkeypatch):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run import build, validate

    cfg = build.compose_config(overrides + ["task=synth_docvqa", "limit=1"])
    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("=", "=")):
        validate.check(cfg, data=False)
