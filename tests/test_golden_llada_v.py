"""Exact parity with the official LLaDA-V code on the golden tiny checkpoint.

The vectors in shared/golden/llada_v were produced by ML-GSAI/LLaDA-V itself (see its
README): visual-token layout, inputs_embeds, one full forward, and generate() for greedy,
random-remasking and temperature runs. Our loader, vision path, engine and sampler must
reproduce them bit for bit on CPU float32.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import golden_dir
from dvlm_exp.engine import Engine
from dvlm_exp.sampler import MaskedDiffusionSampler, SamplerConfig

CASES = ["case_500x300", "case_384x384"]
pytestmark = pytest.mark.skipif(not golden_dir().is_dir(), reason="shared/golden/llada_v not present")


@pytest.fixture(scope="module")
def golden_model():
    from dvlm_exp.models.llada_v import LLaDAV

    return LLaDAV.from_pretrained(golden_dir() / "checkpoint", dtype="float32", device="cpu", load_tokenizer=False)


def load_case(case):
    d = golden_dir() / case
    return (json.loads((d / "input_ids.json").read_text()), json.loads((d / "expected.json").read_text()),
            load_file(str(d / "expected_tensors.safetensors")), Image.open(d / "image.png"))


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_visual_tokens_and_embeddings(golden_model, case):
    ids, exp, tens, img = load_case(case)
    seq, info = golden_model.prepare(ids, [img], gen_length=8)
    vt = exp["visual_tokens"]
    assert info["n_visual"] == vt["total"]
    assert (info["base"], info["grid_rows"], info["grid_cols"]) == (vt["base"], vt["grid_rows"], vt["grid_cols"])
    start, end = vt["image_token_span"]
    vis = torch.nonzero(seq.roles == 1).squeeze(1)
    assert (int(vis[0]), int(vis[-1]) + 1) == (start, end)
    emb = seq.prompt_embeds[None]
    assert list(emb.shape) == exp["inputs_embeds"]["shape"]
    assert sha256(emb) == exp["inputs_embeds"]["sha256"]
    assert torch.equal(seq.prompt_embeds.norm(dim=-1), tens["inputs_embeds_row_l2"])
    base0 = golden_model.encode_views(golden_model_views(golden_model, img)[:1])[0, :8]
    assert torch.equal(base0, tens["vision_features_view0_first8"])


def golden_model_views(model, img):
    from dvlm_exp.models import llava_image

    px, _ = llava_image.process_image(img, model.grid_pinpoints, model.image_size)
    return px


@pytest.mark.parametrize("case", CASES)
def test_full_forward_logits(golden_model, case):
    ids, exp, tens, img = load_case(case)
    f = exp["forward_prompt_plus_8_masks"]
    seq, _ = golden_model.prepare(ids, [img], gen_length=8)
    eng = Engine(golden_model)
    eng.recorder.start_sample()
    logits = eng.forward(seq, step=0, response_rows=None).logits  # every row, as the official forward
    assert list(logits[None].shape) == f["logits_shape"]
    assert sha256(logits[None]) == f["logits_sha256"]
    sub = f["vocab_subset"]
    assert torch.equal(logits[:, sub], tens["logits_vocab_subset_all_positions"])
    assert torch.equal(logits.argmax(-1), tens["logits_argmax_all_positions"])
    lo, hi = f["mask_positions"]
    assert logits[lo:hi].argmax(-1).tolist() == f["argmax_at_mask_positions"]
    if "logits_full_vocab_mask_positions" in tens:
        assert torch.equal(logits[lo:hi], tens["logits_full_vocab_mask_positions"])


def _runs():
    out = []
    for case in CASES:
        exp = json.loads((golden_dir() / case / "expected.json").read_text()) if golden_dir().is_dir() else {}
        for vocab_set, runs in exp.items():
            if vocab_set.startswith("generate_"):
                out += [(case, vocab_set, name) for name in runs]
    return out


@pytest.mark.parametrize("case,vocab_set,name", _runs())
def test_generate_parity(golden_model, case, vocab_set, name):
    ids, exp, _, img = load_case(case)
    run = exp[vocab_set][name]
    p = run["params"]
    model = golden_model
    if "126349" in vocab_set:  # the official loader's resize_token_embeddings(len(tokenizer))
        model = _resized(golden_model, 126349)
    seq, _ = model.prepare(ids, [img], gen_length=p["gen_length"])
    eng = Engine(model)
    eng.recorder.start_sample()
    sampler = MaskedDiffusionSampler(
        SamplerConfig(gen_length=p["gen_length"], block_length=p["block_length"], steps=p["steps"],
                      temperature=p["temperature"], remasking=p["remasking"]), model.banned_ids)
    if p["seed"] is not None:
        torch.manual_seed(p["seed"])
    trace: list = []
    out, _ = sampler.generate(eng, seq, trace=trace)
    assert out == run["output_ids"]
    assert trace == run["unmasked_positions_per_step"]
    assert eng.recorder.current.n_forwards == run["num_forward_passes"]


_RESIZED = {}


def _resized(model, n):
    import copy

    if n not in _RESIZED:
        m = copy.copy(model)
        m._modules = dict(model._modules)  # a shallow copy would share (and resize) the original's parts
        m.embed_tokens = torch.nn.Embedding.from_pretrained(model.embed_tokens.weight[:n].clone())
        head = torch.nn.Linear(model.lm_head.in_features, n, bias=False)
        head.weight.data = model.lm_head.weight[:n].clone()
        m.lm_head = head
        _RESIZED[n] = m
    return _RESIZED[n]


@pytest.mark.parametrize("case", CASES)
def test_fastv_ratio_one_reproduces_official_output(golden_model, case):
    """Pruning machinery engaged (scores at K-1, gather at K) but keeping every token: the
    official greedy output must come out unchanged."""
    from dvlm_exp.pruning.fastv import FastV
    from dvlm_exp.schedule import FirstStep

    ids, exp, _, img = load_case(case)
    run = exp["generate_vocab126464"]["g16_b8_s8_lowconf_t0"]
    p = run["params"]
    seq, _ = golden_model.prepare(ids, [img], gen_length=p["gen_length"])
    eng = Engine(golden_model, FastV(ratio=1.0, layer=1, query_set="masked_response"), FirstStep())
    eng.recorder.start_sample()
    sampler = MaskedDiffusionSampler(SamplerConfig(gen_length=p["gen_length"], block_length=p["block_length"],
                                                   steps=p["steps"]), golden_model.banned_ids)
    out, _ = sampler.generate(eng, seq)
    assert out == run["output_ids"]
    assert eng.recorder.current.scoring_flops > 0  # the scoring path really ran
