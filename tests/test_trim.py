"""prune=trim / study_trim against a naive re-statement of the dMLLM study's TRIM port, on the golden tiny LLaDA-V.

The port (Yrdal3910/dMLLM-Visual-Token-Redundancy-Analysis @ 43849fe) cannot run here (its `llava`
package imports are only partly published, its builder is only in .pyc files), so it is re-stated below
from the cited functions, on the golden checkpoint's weights and a tiny SigLIP text tower made by
dvlm_exp/models/tiny_text_tower.py (random weights, the real layout, text embedding size = the tiny
vision tower's 32):
  siglip_encoder.py  SigLipVisionTower._encode_texts_chunked   the question embedding
                     SigLipVisionTower.forward / feature_select hidden_states[mm_vision_select_layer]
                     SigLipVisionTower.token_reduction          negated softmax, top-k mask, mean token, pad
  llava_arch.py      encode_images (projector on the padded views), the usual anyres packing, then
                     `cur_image_features[:actual_dims[cur_image_idx-1]]` per image
and the LLM part is the study's unpruned generate_with_embeds (tests/test_study_ports.py naive_generate).
Inputs: the three images of tests/test_study_ports.py, keep 0.25 and 0.5, gen/block/steps 16/8/8 and 8/8/4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from test_study_ports import GENS, IMAGES, RATIOS, golden_model, inputs, naive_generate, preset  # noqa: F401
from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig
from dvlm_exp.engine import Engine
from dvlm_exp.engine.state import Roles
from dvlm_exp.schedules.at_step import AtStep

QUESTION = "What is the colour of the large square in the picture, and how many shapes can you count there?"
IMAGE_TOKEN = -200


@pytest.fixture(scope="module")
def text_tower_dir(tmp_path_factory):
    from dvlm_exp.models.tiny_text_tower import write_tiny_text_tower

    return write_tiny_text_tower(tmp_path_factory.mktemp("siglip_text_tiny"), dim=32)


@pytest.fixture(scope="module")
def trim_model(golden_model, text_tower_dir):  # noqa: F811
    from dvlm_exp.models.text_tower import TextTower

    object.__setattr__(golden_model, "text_tower", TextTower.from_pretrained(text_tower_dir))
    return golden_model


# ----------------------------------------------------------------------------------------------
# The port, re-stated

@torch.no_grad()
def port_encode_texts_chunked(text_model, tok, text: str) -> torch.Tensor:
    """_encode_texts_chunked (after _normalize_texts' strip), for one text."""
    text = text.strip()
    max_len = getattr(text_model.config, "max_position_embeddings", 64)
    reserve = tok.num_special_tokens_to_add(pair=False)
    chunk_body_len = max(1, max_len - reserve)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + chunk_body_len] for i in range(0, len(ids), chunk_body_len)] or [[]]
    embeds = []
    for chunk in chunks:
        input_ids = torch.tensor([tok.build_inputs_with_special_tokens(chunk)])
        attention_mask = torch.ones_like(input_ids)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if input_ids.shape[1] < max_len:
            pad_len = max_len - input_ids.shape[1]
            input_ids = F.pad(input_ids, (0, pad_len), value=pad_id)
            attention_mask = F.pad(attention_mask, (0, pad_len), value=0)
        elif input_ids.shape[1] > max_len:
            input_ids, attention_mask = input_ids[:, :max_len], attention_mask[:, :max_len]
        out = text_model(input_ids=input_ids, attention_mask=attention_mask)
        embeds.append(out.pooler_output)  # SigLIP text output: no text_embeds, pooler_output set
    return torch.stack(embeds, dim=0).mean(dim=0)


@torch.no_grad()
def port_token_reduction(image_features, post_layernorm, text_features, pruning_ratio: float):
    """token_reduction with PRUNING_RATIO = pruning_ratio (visual_projection = Identity)."""
    batch_size, tokens_number, _ = image_features.shape
    normed = post_layernorm(image_features)
    similarities = torch.matmul(normed, text_features.unsqueeze(2)).squeeze(2)
    similarities = F.softmax(-similarities, dim=-1)
    num_tokens_to_keep = max(1, min(tokens_number - 1, int(tokens_number * (1.0 - pruning_ratio))))
    _, topk_indices = torch.topk(similarities, num_tokens_to_keep, dim=1, largest=True, sorted=False)
    selected = torch.zeros_like(image_features)
    token_mask = torch.zeros(batch_size, tokens_number, dtype=torch.bool)
    token_mask[torch.arange(batch_size).unsqueeze(1), topk_indices] = True
    selected[:, :num_tokens_to_keep] = image_features[token_mask].view(batch_size, num_tokens_to_keep, -1)
    remaining_mask = torch.logical_not(token_mask)
    selected[:, num_tokens_to_keep] = (image_features * remaining_mask.unsqueeze(-1)).sum(dim=1) / \
        remaining_mask.sum(dim=1, keepdim=True)
    return selected, [num_tokens_to_keep + 1] * batch_size, token_mask


@torch.no_grad()
def port_image_block(model, img, question: str, keep: float):
    """The port's visual block for one anyres image: tower (hidden_states[select_layer]) ->
    token_reduction -> mm_projector on the padded views -> anyres packing -> cut to actual_dims[0]."""
    from dvlm_exp.models import llava_image

    px, size_wh = llava_image.process_image(img, model.grid_pinpoints, model.image_size)
    select_layer = int(model.config["mm_vision_select_layer"])
    hs = model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states
    feats = hs[select_layer]
    tt = model.text_tower
    text = port_encode_texts_chunked(tt.model, tt.tokenizer, question).expand(px.shape[0], -1)  # one text per view
    padded, actual_dims, mask = port_token_reduction(feats, model.vision_tower.post_layernorm, text, 1.0 - keep)
    proj = model.mm_projector(padded)
    packed, _ = llava_image.pack_image_features(  # the packing is llava_arch_original's, unchanged by the port
        proj, size_wh, model.grid_pinpoints, image_size=model.image_size,
        patches_per_side=model.patches_per_side, newline=model.image_newline, max_tiles=model.max_tiles)
    return packed[:actual_dims[0]], torch.nonzero(mask[0]).squeeze(1), feats


def prompt_embeds_with(model, ids, block):
    i = ids.index(IMAGE_TOKEN)
    emb = lambda t: model.embed_tokens(torch.tensor(t, dtype=torch.long))  # noqa: E731
    return torch.cat([emb(ids[:i]), block, emb(ids[i + 1:])]), i


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_study_trim_reduction_matches_port(trim_model, inputs, image, ratio):  # noqa: F811
    method, position_ids, p = preset("study_trim", ratio)
    assert (p["similarity"], p["views"], p["features"], p["append_mean"], p["rounding"], position_ids) == \
        ("negated", "first", "select_layer", True, "floor", "renumber")
    ids, img = inputs[image]
    blocks, info = trim_model.image_features([img], tower=method, question=QUESTION)
    ref_block, ref_kept, feats = port_image_block(trim_model, img, QUESTION, ratio)
    n = feats.shape[1]
    assert info["kept_indices"][0] == ref_kept.tolist()
    assert len(ref_kept) == int(n * ratio) and blocks[0].shape[0] == int(n * ratio) + 1
    assert torch.equal(blocks[0], ref_block)
    # the text embedding the method used is the port's
    tt = trim_model.text_tower
    assert torch.equal(tt.encode(QUESTION), port_encode_texts_chunked(tt.model, tt.tokenizer, QUESTION))
    assert len(tt.windows(QUESTION)) > 1  # the question spans several windows of the tiny tower (16 tokens)


_PORT_BLOCKS: dict = {}
_FULL: dict = {}


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("gen", GENS, ids=lambda g: "g%d_b%d_s%d" % g)
@pytest.mark.parametrize("ratio", RATIOS)
def test_study_trim_generate_matches_port(trim_model, inputs, image, gen, ratio):  # noqa: F811
    method, position_ids, _ = preset("study_trim", ratio)
    ids, img = inputs[image]
    seq, info = trim_model.prepare(ids, [img], gen[0], tower=method, question=QUESTION)
    eng = Engine(trim_model, method, AtStep(0), position_ids=position_ids)
    rec = eng.recorder.start_sample()
    sampler = MaskedDiffusionSampler(SamplerConfig(gen_length=gen[0], block_length=gen[1], steps=gen[2]),
                                     trim_model.banned_ids)
    trace: list = []
    out, _ = sampler.generate(eng, seq, trace=trace)

    key = (image, ratio)  # the port's block does not depend on the generation setting
    if key not in _PORT_BLOCKS:
        _PORT_BLOCKS[key] = port_image_block(trim_model, img, QUESTION, ratio)[0]
    block = _PORT_BLOCKS[key]
    short, s = prompt_embeds_with(trim_model, ids, block)
    ref_out, ref_trace, _ = naive_generate(trim_model, short, s, block.shape[0], *gen, lambda step: (None, {}))
    assert out == ref_out
    assert trace == ref_trace
    # the LLM got the reduced block; the FLOPs baseline is the unpruned sequence
    assert info["n_visual"] == block.shape[0] == rec.visual_kept[0]
    if image not in _FULL:
        full, _ = trim_model.prepare(ids, [img], 0)
        _FULL[image] = (full.prompt_embeds.shape[0], full.n_visual())
    n_prompt, n_vis = _FULL[image]
    assert seq.full_length == n_prompt + gen[0] and seq.n_visual0 == n_vis
    assert set(rec.baseline_forwards) == {n_prompt + gen[0]}


def test_study_trim_several_images_match_port(trim_model, inputs):  # noqa: F811
    """Several images: the port's wrapper forces image_aspect_ratio "pad" (one square view each), the
    views are reduced in one batch, and each image's block (the single-image branch + newline) is cut
    to actual_dims = k + 1."""
    from dvlm_exp.models import llava_image
    from dvlm_exp.models.llada_v import expand_to_square

    imgs = [inputs["case_500x300"][1], inputs["portrait_320x480"][1]]
    method, _, _ = preset("study_trim", 0.25)
    blocks, info = trim_model.image_features(imgs, tower=method, question=QUESTION)
    px = torch.stack([llava_image.siglip_preprocess(expand_to_square(im), trim_model.image_size) for im in imgs])
    with torch.no_grad():
        feats = trim_model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states[
            int(trim_model.config["mm_vision_select_layer"])]
        tt = trim_model.text_tower
        text = port_encode_texts_chunked(tt.model, tt.tokenizer, QUESTION).expand(len(imgs), -1)
        padded, dims, _ = port_token_reduction(feats, trim_model.vision_tower.post_layernorm, text, 0.75)
        proj = trim_model.mm_projector(padded)
    assert len(blocks) == len(imgs)
    for i, blk in enumerate(blocks):
        ref = torch.cat([proj[i], trim_model.image_newline[None]])[:dims[i]]
        assert torch.equal(blk, ref), i
    assert info["n_visual_full"] == 2 * 729 and info["views"] == 2


def test_trim_options(trim_model, inputs):  # noqa: F811
    """similarity: similar keeps the other end; views: all keeps every view's k + 1; features: last."""
    from dvlm_exp.pruning.trim import TRIM

    ids, img = inputs["case_500x300"]
    base, info = trim_model.image_features([img], tower=TRIM(ratio=0.25), question=QUESTION)
    sim, info_s = trim_model.image_features([img], tower=TRIM(ratio=0.25, similarity="similar"), question=QUESTION)
    assert not set(info["kept_indices"][0]) & set(info_s["kept_indices"][0])  # 182 of 729: disjoint ends
    allv, info_a = trim_model.image_features([img], tower=TRIM(ratio=0.25, views="all"), question=QUESTION)
    assert allv[0].shape[0] == info_a["views"] * base[0].shape[0] and torch.equal(allv[0][:base[0].shape[0]], base[0])
    last, _ = trim_model.image_features([img], tower=TRIM(ratio=0.25, features="last", append_mean=False),
                                        question=QUESTION)
    assert last[0].shape[0] == base[0].shape[0] - 1
    # k as the port's token_reduction computes it from PRUNING_RATIO (the fraction dropped)
    for n in (729, 100, 2):
        for keep in (0.1, 0.25, 0.35, 0.5, 0.999, 1.0, 1e-4):
            assert TRIM(ratio=keep).keep_count(n) == max(1, min(n - 1, int(n * (1.0 - (1.0 - keep))))), (n, keep)


def test_text_tower_flops_match_flop_counter(text_tower_dir):
    """The text tower's FLOPs (counted as method overhead, `scoring`) vs torch.utils.flop_counter
    (eager attention, so that the attention matmuls are visible to the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dvlm_exp.models.text_tower import TextTower

    tt = TextTower.from_pretrained(text_tower_dir)
    tt.model.set_attn_implementation("eager")
    for q in (QUESTION, "colour?"):
        with FlopCounterMode(display=False) as fc:
            tt.encode(q)
        assert tt.flops(len(tt.windows(q))) == fc.get_total_flops()


# ----------------------------------------------------------------------------------------------
# bad input, before weights load

def _check(overrides):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.run.validate import check

    with pytest.raises(ConfigError) as e:
        check(compose_config(overrides), data=False)
    return str(e.value)


def test_trim_refuses_bad_text_tower(tmp_path, text_tower_dir):
    msg = _check(["model=tiny", "prune=study_trim"])
    assert "model.text_tower_path" in msg and "hf download google/siglip-so400m-patch14-384" in msg
    assert "no config.json" in _check(["model=tiny", "prune=trim", f"model.text_tower_path={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", "hidden_size": 32}))
    assert "no text_config" in _check(["model=tiny", "prune=trim", f"model.text_tower_path={tmp_path}"])
    msg = _check(["model=tiny", "prune=trim", f"model.text_tower_path={text_tower_dir}", "model.tiny.vision_hidden_size=48"])
    assert "32 dims" in msg and "48" in msg
    assert "has no tower path" in _check(["model=tiny_llava", "prune=trim", f"+model.text_tower_path={text_tower_dir}"])


def test_trim_refuses_wrong_hidden_size_at_run(trim_model, inputs, tmp_path):  # noqa: F811
    from dvlm_exp.models.text_tower import TextTower
    from dvlm_exp.models.tiny_text_tower import write_tiny_text_tower
    from dvlm_exp.pruning.trim import TRIM

    ids, img = inputs["case_384x384"]
    good = trim_model.text_tower
    object.__setattr__(trim_model, "text_tower", TextTower.from_pretrained(write_tiny_text_tower(tmp_path, dim=16)))
    try:
        with pytest.raises(ValueError, match="differ in size"):
            trim_model.image_features([img], tower=TRIM(ratio=0.5), question=QUESTION)
    finally:
        object.__setattr__(trim_model, "text_tower", good)


# ----------------------------------------------------------------------------------------------

def test_cli_study_trim(tmp_path, text_tower_dir):
    env = dict(os.environ, DVLM_OUTPUTS=str(tmp_path / "out"))
    p = subprocess.run([sys.executable, "run.py", "model=tiny", "prune=study_trim", "ratio=0.25", "limit=1",
                        f"model.text_tower_path={text_tower_dir}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["config"]["prune"]["name"] == "trim" and rec["status"] == "complete"
    kept = rec["tokens"]["visual_kept_per_sample"]
    assert kept == rec["tokens"]["visual_per_sample"] == [int(729 * 0.25) + 1]  # base view's k + the mean token
    assert rec["flops"]["baseline_total"] > rec["flops"]["total"] > 0 and rec["flops"]["reduction"] > 0.3
    assert rec["flops"]["by_convention"]["exact"]["scoring"] > 0  # the text tower's forwards
