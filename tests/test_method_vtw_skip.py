"""VTW (withdraw every visual token before layer K) and visual-token layer skipping, against
manual layer-by-layer references on the tiny model.

The references run each decoder layer by hand (explicit per-head softmax attention over the
tokens that layer sees, with their RoPE positions), so a wrong gather, a wrong position policy,
a skipped layer that still lets text attend to the image, or a wrong layer index shows up.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.pruning.skip import LayerSkip
from dvlm_exp.pruning.vtw import VTW
from dvlm_exp.schedules.at_step import AtStep
from dvlm_exp.schedules.first_step import FirstStep

VIS = Roles.VISUAL
T = 4  # tiny model depth
PRESET = dict(gen_length=8, block_length=8, steps=3, think=None, stop=[])


@pytest.fixture(scope="module")
def seq_factory(tiny_model, doc_images):
    cache = {}

    def make(gen_length=8, image=0, commit=()):
        key = (gen_length, image, tuple(commit))
        if key not in cache:  # the vision tower is the slow part; tests never mutate a Sequence
            ids = tiny_model.prompt_ids("What is the total?", n_images=1, think="no_think")
            seq, _ = tiny_model.prepare(ids, [doc_images[image]], gen_length)
            for j, tok in commit:
                seq.response_ids[j] = tok
            cache[key] = seq
        return cache[key]

    return make


def naive_layer(layer, h, cos, sin):
    """One decoder layer by hand: explicit per-head softmax attention, all tokens of `h`."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    n, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    probs = torch.softmax((q @ k.transpose(-1, -2)) / hd ** 0.5, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(1, n, -1)
    h = h + attn.o_proj(out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def embed(model, seq):
    return torch.cat([seq.prompt_embeds, model.embed_tokens(seq.response_ids)])[None]


def engine_forward(model, method, seq, position_ids="keep", schedule=None):
    eng = Engine(model, method, schedule or FirstStep(), position_ids=position_ids)
    eng.recorder.start_sample()
    eng.begin_sample(1)
    out = eng.forward(seq, 0, torch.arange(seq.gen_length))
    return out, [eng.recorder.current.kept_by_step_layer[(0, li)] for li in range(T)]


# ----------------------------------------------------------------------------- VTW
@pytest.mark.parametrize("K,policy", [(2, "renumber"), (2, "keep"), (0, "renumber")])
def test_vtw_logits_equal_manual_withdrawal(tiny_model, seq_factory, K, policy):
    m = tiny_model
    seq = seq_factory(commit=[(2, 300)])
    roles = seq.all_roles().tolist()
    n = len(roles)
    with torch.no_grad():
        h = embed(m, seq)
        cos, sin = m.rotary_emb(h, torch.arange(n)[None])
        for li in range(K):
            h = naive_layer(m.layers[li], h, cos, sin)
        keep = [p for p in range(n) if roles[p] != VIS]  # every visual token withdrawn
        h = h[:, keep]
        pos = torch.tensor(keep) if policy == "keep" else torch.arange(len(keep))
        cos, sin = m.rotary_emb(h, pos[None])
        for li in range(K, T):
            h = naive_layer(m.layers[li], h, cos, sin)
        ref = m.lm_head(m.norm(h[:, -seq.gen_length:]))[0].float()

    out, kept = engine_forward(m, VTW(ratio=0.9, layer=K), seq, position_ids=policy)  # ratio is ignored
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
    n_vis = seq.n_visual()
    assert kept == [n_vis] * K + [0] * (T - K)
    n_prompt = seq.prompt_embeds.shape[0]
    assert out.keep.tolist() == [p for p in keep if p < n_prompt]  # the persisted prompt has no image


@pytest.mark.parametrize("schedule,persist,act", [(FirstStep(), "state", 0), (AtStep(step=1), "state", 1),
                                                  (FirstStep(persist="replay"), "replay", 0)])
def test_vtw_steps_and_persistence(tiny_model, doc_images, schedule, persist, act):
    """state: from the acting step's layer K on, no step sees the image in any layer;
    replay: every later step sees it in layers < K again (AR KV-cache-like)."""
    from dvlm_exp.decoding.generator import GenPreset, Generator

    K = 2
    gen = Generator(tiny_model, VTW(ratio=1.0, layer=K), schedule, GenPreset(**PRESET), position_ids="renumber")
    gen.generate("What is the date?", [doc_images[0]])
    rec = gen.recorder.current
    n_vis = rec.n_visual
    n_full = rec.baseline_forwards.most_common(1)[0][0]
    for step in range(PRESET["steps"]):
        for li in range(T):
            if step < act:
                expect = n_vis
            elif step == act or persist == "replay":
                expect = n_vis if li < K else 0
            else:
                expect = 0
            assert rec.kept_by_step_layer[(step, li)] == expect, (step, li)
    # the text-only sequence length is what the withdrawn layers process
    text_only = sum(c for (nq, _), c in rec.layer_calls.items() if nq == n_full - n_vis)
    later = PRESET["steps"] - act - 1
    assert text_only == (T - K) + (later * (T - K) if persist == "replay" else later * T)


def test_vtw_text_only_after_first_step_matches_imageless_prompt(tiny_model, seq_factory):
    """With state persistence a later step's forward is exactly the model on the prompt with the
    image cut out and renumbered positions: build that prompt by hand and compare logits."""
    m = tiny_model
    seq = seq_factory()
    out, _ = engine_forward(m, VTW(layer=2), seq, position_ids="renumber")
    later = seq.keep_prompt(out.keep)
    assert int((later.roles == VIS).sum()) == 0
    eng = Engine(m, VTW(layer=2), FirstStep(), position_ids="renumber")
    eng.recorder.start_sample()
    got = eng.forward(later, 1, torch.arange(seq.gen_length)).logits  # step 1: not acting
    roles = seq.all_roles().tolist()
    with torch.no_grad():
        h = embed(m, seq)[:, [p for p in range(len(roles)) if roles[p] != VIS]]
        cos, sin = m.rotary_emb(h, torch.arange(h.shape[1])[None])
        for layer in m.layers:
            h = naive_layer(layer, h, cos, sin)
        ref = m.lm_head(m.norm(h[:, -seq.gen_length:]))[0].float()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- layer skipping
@pytest.mark.parametrize("layers", [[1, 3], [0], [0, 1, 2, 3]])
def test_skip_logits_equal_manual_bypass(tiny_model, seq_factory, layers):
    """In a listed layer only the non-visual tokens go through it (attending only to each other,
    at their original positions); the visual hidden states pass unchanged."""
    m = tiny_model
    seq = seq_factory(commit=[(2, 300)])
    roles = seq.all_roles().tolist()
    n = len(roles)
    sub = [p for p in range(n) if roles[p] != VIS]
    with torch.no_grad():
        h = embed(m, seq)
        cos, sin = m.rotary_emb(h, torch.arange(n)[None])
        for li in range(T):
            if li in layers:
                out = naive_layer(m.layers[li], h[:, sub], cos[:, sub], sin[:, sub])
                h = h.clone()
                for j, p in enumerate(sub):
                    h[0, p] = out[0, j]
            else:
                h = naive_layer(m.layers[li], h, cos, sin)
        ref = m.lm_head(m.norm(h[:, -seq.gen_length:]))[0].float()
    out, kept = engine_forward(m, LayerSkip(ratio=0.3, layers=layers), seq)
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
    n_vis = seq.n_visual()
    assert kept == [0 if li in layers else n_vis for li in range(T)]
    assert out.keep is None  # nothing is removed from the state


def test_skip_acts_at_every_step(tiny_model, doc_images):
    """Skipping does not depend on the schedule's acting step: a schedule acting only at step 1
    still has the visual tokens bypass the listed layers at steps 0, 1 and 2."""
    from dvlm_exp.decoding.generator import GenPreset, Generator

    layers = [1, 3]
    gen = Generator(tiny_model, LayerSkip(layers=layers), AtStep(step=1), GenPreset(**PRESET))
    gen.generate("What is the date?", [doc_images[0]])
    rec = gen.recorder.current
    n_vis = rec.n_visual
    n_full = rec.baseline_forwards.most_common(1)[0][0]
    for step in range(PRESET["steps"]):
        assert [rec.kept_by_step_layer[(step, li)] for li in range(T)] == [0 if li in layers else n_vis
                                                                           for li in range(T)]
    assert rec.layer_calls[(n_full - n_vis, n_full - n_vis)] == len(layers) * PRESET["steps"]
    assert rec.layer_calls[(n_full, n_full)] == (T - len(layers)) * PRESET["steps"]


def test_skip_default_is_deep_half(tiny_model, seq_factory):
    method = LayerSkip()
    assert method.skipped(T) == [2, 3] and method.skipped(32) == list(range(16, 32))
    _, kept = engine_forward(tiny_model, method, seq_factory())
    n_vis = seq_factory().n_visual()
    assert kept == [n_vis, n_vis, 0, 0]


def test_skip_empty_list_reproduces_unpruned(tiny_model, doc_images):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    a = Generator(tiny_model, NoPruning(), FirstStep(), GenPreset(**PRESET))
    b = Generator(tiny_model, LayerSkip(layers=[]), FirstStep(), GenPreset(**PRESET))
    assert a.generate("What is the date?", [doc_images[1]]) == b.generate("What is the date?", [doc_images[1]])
    assert a.recorder.current.output_ids == b.recorder.current.output_ids
    assert b.recorder.current.kept_by_step_layer == a.recorder.current.kept_by_step_layer


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["vtw", "skip", "visipruner"])
def test_conf_yaml_builds_the_method(name):
    """conf/prune/<name>.yaml's fields are the constructor's, as the runner passes them."""
    from pathlib import Path

    from dvlm_exp.registry import PRUNERS

    y = OmegaConf.to_container(OmegaConf.load(Path(__file__).parent.parent / "conf" / "prune" / f"{name}.yaml"))
    assert y.pop("name") == name
    assert y.pop("position_ids") in ("keep", "renumber")
    cls = PRUNERS.get(name)
    for key, allowed in cls.choices.items():
        if key in y:
            assert y[key] in allowed
    method = PRUNERS.get(name)(ratio=0.5, seed=0, **y)
    assert method.name == name
    for key in cls.layer_fields:
        assert key in y
