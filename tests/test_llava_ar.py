"""LLaVA AR baselines (llava-hf layout) through our engine: prefill with the method hooks, greedy
decoding on the (pruned) KV cache, and the AR FLOPs.

References are independent of our code: transformers' own `from_pretrained` / `forward` /
`generate(do_sample=False)` on the same tiny checkpoint, attention written out by hand (causal
softmax, head mean, top-k), a plain no-cache recomputation of the pruned model step by step with
transformers' decoder layers, and the FLOPs formulas written as explicit loops.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dvlm_exp.reporting import flops
from dvlm_exp.engine.ar import AREngine, GreedyARSampler
from dvlm_exp.engine.recorder import Recorder, SampleRecord
from dvlm_exp.models.checkpoint import CheckpointError
from dvlm_exp.models.llava_hf import LlavaHF, LlavaNextHF
from dvlm_exp.models.tiny_llava import write_checkpoint
from dvlm_exp.pruning.fastv import FastV
from dvlm_exp.schedules.first_step import FirstStep

KINDS = {"llava": LlavaHF, "llava_next": LlavaNextHF}
QUESTION = "what color is the square?"
MAX_NEW = 10


def _image(seed=0, size=(90, 40)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_ckpt")
    return {k: write_checkpoint(root / k, k, seed=1) for k in KINDS}


@pytest.fixture(scope="module")
def ours(ckpts):
    return {k: cls.from_pretrained(ckpts[k]) for k, cls in KINDS.items()}


@pytest.fixture(scope="module")
def refs(ckpts):
    """transformers' own loader on the same files; loading info must be clean (official layout)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    out = {}
    for k, cls in (("llava", LlavaForConditionalGeneration), ("llava_next", LlavaNextForConditionalGeneration)):
        model, info = cls.from_pretrained(str(ckpts[k]), attn_implementation="sdpa", output_loading_info=True)
        out[k] = (model.eval(), AutoProcessor.from_pretrained(str(ckpts[k])), info)
    return out


def _ref_inputs(proc, image):
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                    add_generation_prompt=True, tokenize=False)
    return proc(images=image, text=text, return_tensors="pt")


def _run(model, pruner=None, image=None, max_new=MAX_NEW, position_ids="keep"):
    rec = Recorder()
    rec.start_sample()
    eng = AREngine(model, pruner, FirstStep() if pruner is not None else None, rec, position_ids=position_ids)
    seq, info = model.prepare(model.prompt_ids(QUESTION, 1), [image or _image()])
    out, _ = GreedyARSampler(max_new, model.eos_ids).generate(eng, seq)
    return out, rec.current, seq, info


class SpyFastV(FastV):
    """FastV that remembers the original indices of the visual tokens it kept."""

    def decide(self, view):
        d = super().decide(view)
        if d is not None:
            self.kept = view.positions[view.visual_index[d.keep]].clone()
        return d


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", list(KINDS))
def test_hub_layout_is_what_transformers_loads(kind, ckpts, refs):
    _, _, info = refs[kind]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    keys = json.loads((ckpts[kind] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(keys.values())) >= 2  # sharded
    prefixes = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.", "multi_modal_projector.")
    assert all(k.startswith(prefixes) or k == "image_newline" for k in keys)
    assert ("image_newline" in keys) == (kind == "llava_next")
    cfg = json.loads((ckpts[kind] / "config.json").read_text())
    assert cfg["model_type"] == kind


def test_v5_layout_loads_too(tmp_path, ours):
    path = write_checkpoint(tmp_path / "v5", "llava", seed=1, layout="v5")
    m = LlavaHF.from_pretrained(path)
    for (k, a), b in zip(m.hf.state_dict().items(), ours["llava"].hf.state_dict().values()):
        assert torch.equal(a, b), k


def _damaged(ckpts, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(ckpts["llava"], path)
    return path


def test_missing_and_unexpected_keys_are_listed(ckpts, tmp_path):
    path = _damaged(ckpts, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    gone = "language_model.model.layers.1.mlp.up_proj.weight"
    shard = path / index["weight_map"][gone]
    tensors = load_file(str(shard))
    del tensors[gone]
    tensors["multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        LlavaHF.from_pretrained(path)
    msg = str(e.value)
    assert "missing keys (1): " + gone in msg
    assert "unexpected keys (1): multi_modal_projector.linear_3.weight" in msg


def test_bad_checkpoints_fail_early(ckpts, tmp_path):
    path = _damaged(ckpts, tmp_path)
    with pytest.raises(CheckpointError, match="model_type='llava', expected 'llava_next'"):
        LlavaNextHF.from_pretrained(path)
    (path / "preprocessor_config.json").unlink()
    (path / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="processor"):
        LlavaHF.from_pretrained(path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing from .*{shard.name}"):
        LlavaHF.from_pretrained(path)


# ----------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("kind", list(KINDS))
def test_unpruned_greedy_equals_transformers_generate(kind, ours, refs):
    model, proc, _ = refs[kind]
    img = _image()
    x = _ref_inputs(proc, img)
    out, rec, seq, info = _run(ours[kind], image=img)
    # the visual span: our expanded prompt is exactly the processor's input_ids
    assert ours[kind].expand_ids(ours[kind].prompt_ids(QUESTION, 1), [info["n_visual"]]) == x["input_ids"][0].tolist()
    with torch.no_grad():
        g = model.generate(**x, do_sample=False, max_new_tokens=MAX_NEW)[0, x["input_ids"].shape[1]:].tolist()
    eos = ours[kind].eos_ids[0]
    assert out == [t for t in g if t != eos][: len(out)] and (len(out) == MAX_NEW or g[len(out)] == eos)
    assert len(out) >= 3
    assert rec.n_forwards == len(out) if len(out) < MAX_NEW else rec.n_forwards == MAX_NEW


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefill_logits_equal_transformers_forward(kind, ours, refs):
    model, proc, _ = refs[kind]
    img = _image(3, (60, 70))
    x = _ref_inputs(proc, img)
    with torch.no_grad():
        want = model(**x).logits[0, -1].float()
    m = ours[kind]
    rec = Recorder()
    rec.start_sample()
    seq, _ = m.prepare(m.prompt_ids(QUESTION, 1), [img])
    got, _ = AREngine(m, None, None, rec).prefill(seq)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- FastV at prefill
def _naive_scores(ref, x, layer, query_set):
    """Layer `layer` of the unpruned model by hand: causal softmax per head, head mean, rows of the
    query set averaged -> attention each key receives."""
    lm = ref.model.language_model
    with torch.no_grad():
        hs = ref.model(**x, output_hidden_states=True).hidden_states[layer]  # input of layer `layer`
        attn = lm.layers[layer].self_attn
        h = lm.layers[layer].input_layernorm(hs)
        n = h.shape[1]
        dh = attn.head_dim
        q = attn.q_proj(h).view(1, n, -1, dh).transpose(1, 2)
        k = attn.k_proj(h).view(1, n, -1, dh).transpose(1, 2)
        cos, sin = lm.rotary_emb(h, torch.arange(n)[None])
        rot = lambda t: torch.cat([-t[..., dh // 2:], t[..., : dh // 2]], dim=-1)  # noqa: E731
        q = q * cos[:, None] + rot(q) * sin[:, None]
        k = k * cos[:, None] + rot(k) * sin[:, None]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        a = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        a = a.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)[0].mean(0)  # [n, n]
    rows = a[-1:] if query_set == "last_token" else a
    return rows.mean(0)


@pytest.mark.parametrize("query_set", ["last_token", "all"])
def test_fastv_prefill_selection_equals_naive(query_set, ours, refs):
    model, proc, _ = refs["llava_next"]
    img = _image()
    x = _ref_inputs(proc, img)
    K, ratio = 2, 0.5
    spy = SpyFastV(ratio=ratio, layer=K, query_set=query_set)
    _run(ours["llava_next"], spy, img, max_new=2)
    scores = _naive_scores(model, x, K - 1, query_set)
    vis = torch.nonzero(x["input_ids"][0] == model.config.image_token_id).squeeze(1)
    n_keep = round(vis.numel() * ratio)
    want = torch.sort(vis[torch.topk(scores[vis], n_keep).indices]).values
    assert torch.equal(spy.kept, want)


def _naive_pruned_generate(ref, x, keep_prompt, K, steps):
    """No cache: each step reruns the whole sequence, layers < K on every token, layers >= K on the
    kept prompt tokens + the generated ones, original positions, causal masks; greedy."""
    lm = ref.model.language_model
    with torch.no_grad():
        emb = lm.embed_tokens(x["input_ids"])
        px = {k: x[k] for k in ("pixel_values", "image_sizes") if k in x}
        feats = torch.cat(list(ref.model.get_image_features(**px).pooler_output))
        emb = emb.masked_scatter((x["input_ids"] == ref.config.image_token_id)[..., None], feats)[0]
        P = emb.shape[0]

        def run(h, pos, layers):
            cs = lm.rotary_emb(h, pos[None])
            n = h.shape[1]
            mask = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))[None, None]
            for layer in layers:
                h = layer(h, attention_mask=mask, position_embeddings=cs)
            return h

        out = []
        for _ in range(steps):
            gen = lm.embed_tokens(torch.tensor(out, dtype=torch.long)) if out else emb[:0]
            h = torch.cat([emb, gen])[None]
            pos = torch.arange(h.shape[1])
            h = run(h, pos, lm.layers[:K])
            keep = torch.cat([keep_prompt, torch.arange(P, P + len(out))])
            h = run(h[:, keep], pos[keep], lm.layers[K:])
            out.append(int(ref.lm_head(lm.norm(h))[0, -1].argmax()))
        return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_decoding_on_pruned_cache_equals_naive_recompute(kind, ours, refs):
    model, proc, _ = refs[kind]
    img = _image()
    x = _ref_inputs(proc, img)
    K = 2
    spy = SpyFastV(ratio=0.25, layer=K)
    out, rec, seq, info = _run(ours[kind], spy, img, max_new=6)
    ids = x["input_ids"][0]
    keep_prompt = torch.sort(torch.cat([torch.nonzero(ids != model.config.image_token_id).squeeze(1), spy.kept])).values
    want = _naive_pruned_generate(model, x, keep_prompt, K, len(out))
    assert out == want
    # layers >= K cached only the kept visual tokens; decode calls saw them
    n_vis, kept = info["n_visual"], spy.kept.numel()
    assert rec.kept_by_step_layer[(0, K - 1)] == n_vis and rec.kept_by_step_layer[(0, K)] == kept
    assert rec.kept_by_step_layer[(1, K - 1)] == n_vis and rec.kept_by_step_layer[(1, K)] == kept


def test_ratio_one_equals_unpruned(ours):
    base, rec0, _, _ = _run(ours["llava_next"])
    full, rec1, _, _ = _run(ours["llava_next"], FastV(ratio=1.0, layer=2))
    assert full == base
    assert rec1.layer_calls == rec0.layer_calls


def test_other_methods_run_on_the_ar_baseline(ours):
    from dvlm_exp.pruning.sparsevlm import SparseVLM
    from dvlm_exp.pruning.visipruner import VisiPruner
    from dvlm_exp.pruning.vtw import VTW

    m = ours["llava"]
    for method in (SparseVLM(layers=(1, 2), ratio=0.5, version="v2"), VisiPruner(shallow_mid_layer=1),
                   VTW(layer=2), FastV(ratio=0.5, layer=1, query_set="all", position_ids="renumber")):
        out, rec, _, info = _run(m, method, max_new=3, position_ids=method.position_ids)
        assert out, method.name
        assert min(rec.visual_kept) <= info["n_visual"]


# ----------------------------------------------------------------------------- FLOPs
LLAVA_7B = dict(d=4096, m=11008, layers=32)


def test_fastv_paper_sanity_check():
    """FastV README: LLaVA-1.5-7B, K=3, R=50 % -> "FLOPS = 57 %"; methods.md §5.6: 0.579 with
    576 image tokens + 55 text tokens (n = 631)."""
    n, nv, K, R = 631, 576, 3, 0.5
    d, m, T = 4096, 11008, 32
    f = lambda x: 4 * x * d * d + 2 * x * x * d + 2 * x * d * m  # noqa: E731
    n_hat = n - 288
    hand = (K * f(n) + (T - K) * f(n_hat)) / (T * f(n))
    assert abs(hand - 0.579) < 5e-4
    assert flops.fastv_prefill_ratio(n, nv, K, R, LLAVA_7B) == pytest.approx(hand, rel=1e-12)
    # ... and from recorded counts, as the AR engine records a prefill
    rec = SampleRecord()
    rec.layer_calls.update({(n, n): K, (n_hat, n_hat): T - K})
    rec.baseline_layer_calls.update({(n, n): T})
    out = flops.sample_flops(rec, LLAVA_7B, "fastv_paper")
    assert out["total"] / out["baseline_total"] == pytest.approx(hand, rel=1e-12)


def test_eq7_closed_form_equals_sum():
    n, L, d, m, T = 631, 17, 4096, 11008, 32
    hand = sum(T * (4 * d * d + 2 * d * m + 2 * d * (n + i)) for i in range(L))
    assert flops.ar_decode_flops_eq7(n, L, LLAVA_7B) == hand


def test_ar_flops_from_recorded_counts_equal_hand_count(ours):
    m = ours["llava"]
    K = 2
    spy = SpyFastV(ratio=0.5, layer=K)
    out, rec, seq, info = _run(m, spy, max_new=7)
    dims = m.dims()
    d, mm, T = dims["d"], dims["m"], dims["layers"]
    n = seq.prompt_len0
    n_hat = n - info["n_visual"] + spy.kept.numel()
    L = rec.n_forwards - 1  # decode steps = tokens fed back
    lengths = [n] * K + [n_hat] * (T - K)

    def total(lens):
        s = 0
        for nl in lens:
            s += 4 * nl * d * d + 2 * nl * nl * d + 2 * nl * d * mm  # prefill
            for j in range(1, L + 1):  # decode token j attends to the cache + itself
                s += 4 * d * d + 2 * (nl + j) * d + 2 * d * mm
        return s

    got = flops.sample_flops(rec, dims, "fastv_paper")
    assert got["total"] == total(lengths) == flops.ar_flops_paper(lengths, L, dims)
    assert got["baseline_total"] == total([n] * T)
    exact = flops.sample_flops(rec, dims, "exact")
    assert exact["lm_head"] == 2 * (L + 1) * d * dims["vocab"] and exact["total"] < exact["baseline_total"]


# ----------------------------------------------------------------------------- Generator / runner
def test_generator_runs_the_ar_path(dvlm_cache):
    from dvlm_exp.run.build import build_generator, compose_config

    cfg = compose_config(["model=tiny_llava", "prune=fastv", "prune.layer=2", "ratio=0.5", "limit=1"])
    gen = build_generator(cfg)
    text = gen.generate(QUESTION, [_image()], sample_id=0)
    rec = gen.recorder.current
    assert isinstance(text, str) and rec.generated_tokens == len(rec.output_ids) > 0
    summary = flops.summarize(gen.recorder.samples, gen.model.dims())
    assert 0 < summary["by_convention"]["fastv_paper"]["reduction"] < 1


def test_validate_reads_the_nested_text_depth(ckpts):
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    base = ["model=llava_1_5", f"model.path={ckpts['llava']}", "prune=fastv"]
    check(compose_config(base + ["prune.layer=3"]), data=False)
    with pytest.raises(ConfigError, match=r"prune.layer=4 is outside \[1, 3\] .*4 decoder layers"):
        check(compose_config(base + ["prune.layer=4"]), data=False)
    with pytest.raises(ConfigError, match="model_type='llava', expected 'llava_next'"):
        check(compose_config(["model=llava_next", f"model.path={ckpts['llava']}", "prune=fastv"]), data=False)
