"""prune=study_trim_lavida against a naive re-statement of the dMLLM study's TRIM port on LaViDa-Dream.

The port (Yrdal3910/dMLLM-Visual-Token-Redundancy-Analysis @ 43849fe) cannot run here (its `llava`
package is only partly published), so it is re-stated below from the cited functions, on a tiny
LaViDa-Dream checkpoint (dvlm_exp/models/tiny_lavida.py; vision width 32, two SigLIP layers) and a tiny
SigLIP text tower (dvlm_exp/models/tiny_text_tower.py; hidden size = projection size = 32, the vision width):
  LaViDa/eval/lmms_eval/models/llava_dream.py  Llava_Dream.generate_until  texts=raw_questions (the context)
  LaViDa/eval/llava_trim/model/multimodal_encoder/siglip_encoder.py
      SigLipVisionTower._encode_texts_chunked   no strip; `pad_token_id or eos_token_id`; the window
                                                embedding falls through to last_hidden_state[:, 0]
      SigLipVisionTower.forward / feature_select hidden_states[mm_vision_select_layer]
      SigLipVisionTower.token_reduction          k = 0.1 literal (here: the ratio), int(N * k) in [1, N],
                                                 negated softmax, top-k mask, mean token, zero pad
  LaViDa/eval/llava_trim/model/llava_arch.py prepare_inputs_labels_for_multimodal
      encode_images (projector on the padded views), NO get_2dPool for images, the unpooled anyres
      packing (27x27 grids, unpad, newline), then `cur_image_features[:actual_dims[cur_image_idx-1]]`
  LaViDa/eval/llava_trim/model/language_model/llava_dream.py generate -> diffusion_generate on the
      spliced embeddings, positions 0..L'-1 (tests/test_lavida.py naive_dream_sample, the plain Dream loop)
Settings: the study's Table 2 generation 4/4/2 (sweeps/task/dream_*.yaml) and 16/16/8, keep 0.25 and 0.5.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dvlm_exp.decoding.generator import GenPreset, Generator
from dvlm_exp.schedules.first_step import FirstStep
from test_lavida import naive_dream_sample, noise_image, one_thread  # noqa: F401
from test_study_ports import preset

QUESTION = "  What is the colour of the large square in the picture, and how many shapes can you count there?\n"
IMAGE_TOKEN = -200
GENS = [(4, 4, 2), (16, 16, 8)]  # Table 2's gen/block/steps for the short answers, and a longer one
RATIOS = [0.25, 0.5]
SIZES = [(800, 600), (500, 300)]
SPEC = dict(num_attention_heads=4, num_key_value_heads=2, vision_hidden_size=32, vision_layers=2,
            vision_heads=2, vision_intermediate_size=64)


@pytest.fixture(scope="module")
def text_tower_dir(tmp_path_factory):
    from dvlm_exp.models.tiny_text_tower import write_tiny_text_tower

    return write_tiny_text_tower(tmp_path_factory.mktemp("siglip_text_tiny"), dim=32)


@pytest.fixture(scope="module")
def dream_ckpt(tmp_path_factory):
    from dvlm_exp.models.tiny_lavida import write_lavida_checkpoint

    return write_lavida_checkpoint(tmp_path_factory.mktemp("lavida_dream_trim"), "dream", SPEC, seed=2)


@pytest.fixture(scope="module")
def model(dream_ckpt, text_tower_dir):
    from dvlm_exp.models.lavida import LaViDaDream
    from dvlm_exp.models.text_tower import TextTower

    m = LaViDaDream.from_pretrained(dream_ckpt)
    object.__setattr__(m, "text_tower", TextTower.from_pretrained(text_tower_dir))
    return m


@pytest.fixture(scope="module")
def weights(dream_ckpt):
    from safetensors.torch import load_file

    W = {}
    for f in sorted(dream_ckpt.glob("model-*.safetensors")):
        W.update(load_file(str(f)))
    return {k: v.float() for k, v in W.items()}


# ----------------------------------------------------------------------------------------------
# The LaViDa port, re-stated

@torch.no_grad()
def port_encode_texts_chunked(text_model, tok, text: str) -> torch.Tensor:
    """_encode_texts_chunked for one text, as SigLipVisionTower.forward calls it (the text as given)."""
    max_len = getattr(text_model.config, "max_position_embeddings", 64)
    reserve = tok.num_special_tokens_to_add(pair=False)
    chunk_body_len = max(1, max_len - reserve)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + chunk_body_len] for i in range(0, len(ids), chunk_body_len)] or [[]]
    embeds = []
    for ch in chunks:
        input_ids = torch.tensor([tok.build_inputs_with_special_tokens(ch)])
        attn = torch.ones_like(input_ids)
        pad_id = tok.pad_token_id or tok.eos_token_id
        if input_ids.shape[1] < max_len:
            pad_len = max_len - input_ids.shape[1]
            input_ids = F.pad(input_ids, (0, pad_len), value=pad_id)
            attn = F.pad(attn, (0, pad_len), value=0)
        elif input_ids.shape[1] > max_len:
            input_ids, attn = input_ids[:, :max_len], attn[:, :max_len]
        out = text_model(input_ids=input_ids, attention_mask=attn, output_hidden_states=False)
        if hasattr(out, "text_embeds") and out.text_embeds is not None:
            embeds.append(out.text_embeds)
        else:
            cls = out.last_hidden_state[:, 0]
            embeds.append(text_model.text_projection(cls) if hasattr(text_model, "text_projection") else cls)
    return torch.stack(embeds, dim=0).mean(dim=0)


@torch.no_grad()
def port_token_reduction(image_features, post_layernorm, text_features, k: float):
    """token_reduction with the literal `k` (the fraction kept); visual_projection = Identity."""
    batch_size, tokens_number, dimension = image_features.shape
    normed = post_layernorm(image_features)
    similarities = torch.matmul(normed, text_features.unsqueeze(2)).squeeze(2)
    similarities = F.softmax(-similarities, dim=-1)
    num_tokens_to_keep = max(1, min(tokens_number, int(tokens_number * k)))
    _, topk_indices = torch.topk(similarities, num_tokens_to_keep, dim=1, largest=True, sorted=False)
    selected = torch.zeros_like(image_features)
    token_mask = torch.zeros(batch_size, tokens_number, dtype=torch.bool)
    token_mask[torch.arange(batch_size).unsqueeze(1), topk_indices] = True
    selected[:, :num_tokens_to_keep] = image_features[token_mask].view(batch_size, num_tokens_to_keep, -1)
    remaining_mask = torch.logical_not(token_mask)
    if remaining_mask.sum(dim=1).min().item() > 0:
        remaining_mean = (image_features * remaining_mask.unsqueeze(-1)).sum(dim=1) / \
            remaining_mask.sum(dim=1, keepdim=True)
    else:
        remaining_mean = torch.zeros(batch_size, dimension)
    selected[:, num_tokens_to_keep] = remaining_mean
    return selected, [num_tokens_to_keep + 1] * batch_size, token_mask


@torch.no_grad()
def port_image_block(model, img, question: str, k: float):
    """One anyres image: tower -> token_reduction -> mm_projector on the padded views -> the UNPOOLED
    anyres packing (no get_2dPool in the image branch) -> cut to actual_dims[0]."""
    from dvlm_exp.models import llava_image

    px, size_wh = llava_image.process_image(img, model.grid_pinpoints, model.image_size)
    feats = model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states[
        int(model.config["mm_vision_select_layer"])]
    tt = model.text_tower
    text = port_encode_texts_chunked(tt.model, tt.tokenizer, question)  # [1, D], broadcast over the views
    padded, actual_dims, mask = port_token_reduction(feats, model.vision_tower.post_layernorm, text, k)
    proj = model.mm_projector(padded)
    height = width = model.patches_per_side
    assert height * width == proj[0].shape[0]  # the port's assert on the base view: 27 x 27, not pooled
    packed, _ = llava_image.pack_image_features(
        proj, size_wh, model.grid_pinpoints, image_size=model.image_size, patches_per_side=height,
        newline=model.image_newline, max_tiles=None)  # "anyres", not "anyres_max_N"
    return packed[:actual_dims[0]], torch.nonzero(mask[0]).squeeze(1), feats


def spliced(model, ids, block):
    i = ids.index(IMAGE_TOKEN)
    emb = lambda t: model.embed_tokens(torch.tensor(t, dtype=torch.long))  # noqa: E731
    return torch.cat([emb(ids[:i]), block, emb(ids[i + 1:])])


# ----------------------------------------------------------------------------------------------

def test_preset_is_the_lavida_port():
    _, position_ids, p = preset("study_trim_lavida", 0.25)
    assert (p["text_embedding"], p["text_strip"], p["similarity"], p["views"], p["features"], p["append_mean"],
            p["rounding"], position_ids) == ("first_token", False, "negated", "first", "select_layer", True, "floor",
                                             "renumber")
    # k: the LaViDa port's int(N * k), clamped to [1, N] (N = 729 unpooled tokens per view), at every
    # ratio the port can run (at k = 1 it indexes past the padded block)
    from dvlm_exp.pruning.trim import TRIM

    for i in range(1, 100):
        assert TRIM(ratio=i / 100).keep_count(729) == max(1, min(729, int(729 * (i / 100)))), i


class _SeenTexts:
    """The text tower's tokenizer, recording the texts it is given."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def __call__(self, text, **kw):
        self.seen.append(text)
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_the_question_reaches_the_text_tower_as_in_each_port(model):
    """LaViDa port: the lmms-eval context as given (generate_until texts=raw_questions, no strip); the LLaDA-V
    port strips it (_normalize_texts). The tiny SentencePiece tokenizer canonicalises whitespace itself, so
    the texts handed to the tokenizer are compared (SigLIP2's Gemma tokenizer keeps it)."""
    from dvlm_exp.models.text_tower import TextTower

    img = noise_image(800, 600, seed=800)
    good = model.text_tower
    for name, want in (("study_trim_lavida", QUESTION), ("study_trim", QUESTION.strip())):
        tok = _SeenTexts(good.tokenizer)
        object.__setattr__(model, "text_tower", TextTower(good.model, tok))
        try:
            model.image_features([img], tower=preset(name, 0.25)[0], question=QUESTION)
        finally:
            object.__setattr__(model, "text_tower", good)
        assert tok.seen and set(tok.seen) == {want}, name


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "%dx%d" % s)
@pytest.mark.parametrize("ratio", RATIOS)
def test_study_trim_lavida_reduction_matches_port(model, size, ratio):
    method, _, _ = preset("study_trim_lavida", ratio)
    img = noise_image(*size, seed=size[0])
    blocks, info = model.image_features([img], tower=method, question=QUESTION)
    ref_block, ref_kept, feats = port_image_block(model, img, QUESTION, ratio)
    n = feats.shape[1]
    assert n == 729  # every view unpooled
    assert info["kept_indices"][0] == ref_kept.tolist()
    assert len(ref_kept) == int(n * ratio) and blocks[0].shape[0] == int(n * ratio) + 1
    assert torch.equal(blocks[0], ref_block)
    tt = model.text_tower
    assert torch.equal(tt.encode(QUESTION, embedding="first_token", strip=False),
                       port_encode_texts_chunked(tt.model, tt.tokenizer, QUESTION))
    assert len(tt.windows(QUESTION, strip=False)) > 1  # several windows of the tiny tower (16 tokens)
    # the FLOPs baseline is LaViDa's unpruned (pooled) sequence
    assert info["n_visual_full"] == model.image_features([img])[0][0].shape[0]


_BLOCKS: dict = {}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "%dx%d" % s)
@pytest.mark.parametrize("gen", GENS, ids=lambda g: "g%d_b%d_s%d" % g)
@pytest.mark.parametrize("ratio", RATIOS)
def test_study_trim_lavida_generate_matches_port(model, weights, size, gen, ratio):
    method, position_ids, _ = preset("study_trim_lavida", ratio)
    img = noise_image(*size, seed=size[0])
    g = Generator(model, method, FirstStep(), GenPreset(gen_length=gen[0], block_length=gen[1], steps=gen[2]),
                  position_ids=position_ids, sampler_kwargs=dict(alg="topk_margin"))
    g.generate(QUESTION, [img])
    rec = g.recorder.current

    key = (size, ratio)
    if key not in _BLOCKS:
        _BLOCKS[key] = port_image_block(model, img, QUESTION, ratio)[0]
    block = _BLOCKS[key]
    ids = model.prompt_ids(QUESTION, 1)
    seq = SimpleNamespace(prompt_embeds=spliced(model, ids, block),
                          response_ids=torch.full((gen[0],), model.mask_id, dtype=torch.long))
    want = naive_dream_sample(model, weights, seq, min(gen[2], gen[0]), "topk_margin")
    assert rec.output_ids == want
    assert rec.visual_kept[0] == block.shape[0] == int(729 * ratio) + 1


def test_study_trim_lavida_several_images_match_port(model):
    """Several images: the wrapper forces image_aspect_ratio "pad", process_images stacks a 4-D tensor, the
    plain encode_images branch: [n, 729, d] padded, each image cut to actual_dims = k + 1 (no newline)."""
    from dvlm_exp.models import llava_image
    from dvlm_exp.models.llada_v import expand_to_square

    imgs = [noise_image(500, 300, seed=5), noise_image(320, 480, seed=6)]
    method, _, _ = preset("study_trim_lavida", 0.25)
    blocks, info = model.image_features(imgs, tower=method, question=QUESTION)
    px = torch.stack([llava_image.siglip_preprocess(expand_to_square(im), model.image_size) for im in imgs])
    with torch.no_grad():
        feats = model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states[
            int(model.config["mm_vision_select_layer"])]
        tt = model.text_tower
        text = port_encode_texts_chunked(tt.model, tt.tokenizer, QUESTION)
        padded, dims, _ = port_token_reduction(feats, model.vision_tower.post_layernorm, text, 0.25)
        proj = model.mm_projector(padded)
    assert len(blocks) == 2
    for i, blk in enumerate(blocks):
        assert torch.equal(blk, proj[i][:dims[i]]), i
    assert info["n_visual_full"] == 2 * 729


def test_same_vision_path_on_lavida_llada(tmp_path, text_tower_dir):
    """The LLaDA backbone shares LaViDa's vision code (the study has no LaViDa-LLaDA TRIM port): the same
    block as the Dream port's re-statement, and the pooled unpruned count as the FLOPs baseline."""
    from dvlm_exp.models.lavida import LaViDaLLaDA
    from dvlm_exp.models.text_tower import TextTower
    from dvlm_exp.models.tiny_lavida import write_lavida_checkpoint

    m = LaViDaLLaDA.from_pretrained(write_lavida_checkpoint(tmp_path / "llada", "llada", SPEC, seed=3))
    object.__setattr__(m, "text_tower", TextTower.from_pretrained(text_tower_dir))
    img = noise_image(800, 600, seed=9)
    blocks, info = m.image_features([img], tower=preset("study_trim_lavida", 0.5)[0], question=QUESTION)
    ref, kept, _ = port_image_block(m, img, QUESTION, 0.5)
    assert info["kept_indices"][0] == kept.tolist() and torch.equal(blocks[0], ref)
    assert info["n_visual_full"] == m.image_features([img])[0][0].shape[0]


def _check(overrides):
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.run.validate import check

    return check(compose_config(overrides), data=False, weights=False)


def test_lavida_trim_validates_before_loading(tmp_path, text_tower_dir):
    import shutil

    from conftest import REPO
    from dvlm_exp.errors import ConfigError

    d = tmp_path / "dream"
    d.mkdir()
    shutil.copy(REPO / "tests" / "data" / "lavida_dream_config.json", d / "config.json")
    with pytest.raises(ConfigError, match="model.text_tower_path"):
        _check(["model=lavida_dream", f"model.path={d}", "prune=study_trim_lavida"])
    # the tiny text tower is 32 wide, LaViDa's features 1152: refused, naming both
    with pytest.raises(ConfigError, match="32 dims"):
        _check(["model=lavida_dream", f"model.path={d}", "prune=study_trim_lavida",
                f"model.text_tower_path={text_tower_dir}"])
    # the released text tower's config (1152 wide) passes, on both LaViDa backbones
    t = tmp_path / "siglip"
    t.mkdir()
    shutil.copy(REPO / "tests" / "data" / "siglip_so400m_config.json", t / "config.json")
    (t / "spiece.model").write_bytes(b"")
    _check(["model=lavida_dream", f"model.path={d}", "prune=study_trim_lavida", f"model.text_tower_path={t}"])
    ll = tmp_path / "llada"
    ll.mkdir()
    shutil.copy(REPO / "tests" / "data" / "lavida_llada_config.json", ll / "config.json")
    _check(["model=lavida_llada", f"model.path={ll}", "prune=study_trim_lavida", f"model.text_tower_path={t}"])


def test_cli_study_trim_lavida(tmp_path, dream_ckpt, text_tower_dir):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, DVLM_OUTPUTS=str(tmp_path / "out"))
    p = subprocess.run([sys.executable, "run.py", "model=lavida_dream", f"model.path={dream_ckpt}", "model.dtype=float32",
                        "model.device=cpu", f"model.text_tower_path={text_tower_dir}", "prune=study_trim_lavida",
                        "ratio=0.25", "limit=1", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["config"]["prune"]["name"] == "trim" and rec["status"] == "complete"
    assert rec["tokens"]["visual_kept_per_sample"] == [int(729 * 0.25) + 1]  # base view's k + the mean token
    assert rec["flops"]["baseline_total"] > rec["flops"]["total"] > 0
    assert rec["flops"]["by_convention"]["exact"]["scoring"] > 0  # the text tower's forwards
