"""RedVTP against a naive reference on the tiny model (methods.md §3.2).

The reference runs step 0 by hand: every decoder layer written out with the full eager
attention matrix (every head, every query), the step-0 unmasking done like the official loop,
then the layer- and head-mean attention from the response slots still masked to each visual
token, with explicit loops. The engine + method must keep the same visual tokens after step 0,
run step 0 in full and every later step on the pruned, renumbered sequence.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.pruning.redvtp import RedVTP
from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig
from dvlm_exp.schedules.first_step import FirstStep

GEN, STEPS = 8, 4


@pytest.fixture(scope="module")
def seq_factory(tiny_model, doc_images):
    def make(gen_length=GEN, image=0, commit=()):
        ids = tiny_model.prompt_ids("What is the total?", n_images=1, think="no_think")
        seq, _ = tiny_model.prepare(ids, [doc_images[image]], gen_length)
        for j, tok in commit:  # some answer slots already decoded
            seq.response_ids[j] = tok
        return seq

    return make


# ----------------------------------------------------------------------------- naive reference
def naive_step(model, prompt_embeds, response_ids, positions):
    """One forward written out by hand. Returns (per-layer head-mean attention [T][n, n], logits
    of every row [n, V])."""
    with torch.no_grad():
        h = torch.cat([prompt_embeds, model.embed_tokens(response_ids)])[None]
        cos, sin = model.rotary_emb(h, positions[None])
        maps = []
        for layer in model.layers:
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            n, hd = x.shape[1], attn.head_dim
            q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
            v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)  # [1, H, n, n], no mask
            maps.append(probs[0].mean(0))
            o = (probs @ v).transpose(1, 2).reshape(1, n, -1)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(model.norm(h))[0].float()
    return maps, logits


def naive_first_transfer(model, logits_resp, is_mask, steps):
    """Slots the official loop unmasks at step 0 (single block, low_confidence, temperature 0)."""
    logits = logits_resp.clone()
    for tok in model.banned_ids:
        for j in range(logits.shape[0]):
            if is_mask[j]:
                logits[j, tok] = -float("inf")
    n_masked = int(is_mask.sum())
    k0 = n_masked // steps + (1 if n_masked % steps else 0)
    conf = []
    for j in range(logits.shape[0]):
        p = torch.softmax(logits[j].double(), dim=-1)
        conf.append(float(p.max()) if is_mask[j] else -float("inf"))
    order = sorted(range(len(conf)), key=lambda j: -conf[j])
    return sorted(order[:k0])


def naive_redvtp(model, seq, maps, logits, ratio, query_set, steps=STEPS):
    """(visual scores [N], expected kept visual indices, step-0 transfer) by hand, from the
    per-layer attention maps and logits of step 0 (`naive_step`)."""
    roles = seq.all_roles()
    n = roles.numel()
    G = seq.gen_length
    masked_before = [bool(m) for m in seq.is_mask]
    transfer = naive_first_transfer(model, logits[n - G:], seq.is_mask, steps)
    still = [masked_before[j] and j not in transfer for j in range(G)]
    if query_set == "masked_response":
        queries = [n - G + j for j in range(G) if still[j]]
    else:
        queries = [n - G + j for j in range(G)]
    vis = torch.tensor([i for i in range(n) if roles[i] == Roles.VISUAL])
    scores = torch.zeros(vis.numel(), dtype=torch.float64)
    for q in queries:
        for A in maps:  # every layer, head-mean already
            scores += A[q, vis].double() / len(maps)
    scores /= len(queries)
    kept = max(1, int(vis.numel() * ratio))  # the authors' rounding
    ranked = sorted(range(vis.numel()), key=lambda j: -float(scores[j]))
    return scores, sorted(ranked[:kept]), transfer


def kept_visual_indices(seq0, seq1) -> list[int]:
    """Indices (among seq0's visual tokens) of the visual tokens left in the pruned state seq1."""
    vis_pos = seq0.positions[seq0.roles == Roles.VISUAL]
    left = seq1.positions[seq1.roles == Roles.VISUAL]
    return torch.searchsorted(vis_pos, left).tolist()


# ----------------------------------------------------------------------------- tests
COMMIT = [(2, 300)]  # one slot decoded before step 0: never a masked_response query


@pytest.fixture(scope="module")
def step0_reference(tiny_model, seq_factory):
    ref = seq_factory(commit=COMMIT)
    maps, logits = naive_step(tiny_model, ref.prompt_embeds, ref.response_ids, torch.arange(ref.length))
    return ref, maps, logits


@pytest.mark.parametrize("query_set", ["masked_response", "response"])
def test_selection_after_step0_matches_naive(tiny_model, seq_factory, step0_reference, query_set):
    ratio = 0.35  # 1728 * 0.35 = 604.8: floor (604) differs from round (605)
    ref, maps, logits = step0_reference
    exp_scores, exp_keep, exp_transfer = naive_redvtp(tiny_model, ref, maps, logits, ratio, query_set)

    seq = seq_factory(commit=COMMIT)
    n_vis = seq.n_visual()
    method = RedVTP(ratio=ratio, query_set=query_set)
    eng = Engine(tiny_model, method, FirstStep(), position_ids="renumber")
    eng.recorder.start_sample()
    sampler = MaskedDiffusionSampler(SamplerConfig(gen_length=GEN, block_length=GEN, steps=STEPS),
                                     tiny_model.banned_ids)
    trace: list = []
    _, final = sampler.generate(eng, seq, [], trace=trace)

    assert trace[0] == exp_transfer  # step 0 ran in full: same unmasking as the reference
    torch.testing.assert_close(method.last_importance.double(), exp_scores, rtol=1e-3, atol=1e-8)
    got = kept_visual_indices(ref, final)
    assert len(got) == int(n_vis * ratio) == len(exp_keep)
    assert got == exp_keep
    # every text token survives, in order
    text = ref.positions[ref.roles == Roles.TEXT].tolist()
    assert final.positions[final.roles == Roles.TEXT].tolist() == text
    assert final.n_visual0 == n_vis


def test_step0_full_then_pruned_renumbered_state(tiny_model, seq_factory):
    """Step 0's logits equal the unpruned forward; after_step slices the state; step 1 runs on
    the survivors with positions 0..n'-1 in every layer."""
    ratio = 0.5
    seq = seq_factory()
    rows = torch.arange(seq.gen_length)
    base = Engine(tiny_model, NoPruning(), FirstStep())
    base.recorder.start_sample()
    ref_logits = base.forward(seq, 0, rows).logits

    method = RedVTP(ratio=ratio)
    eng = Engine(tiny_model, method, FirstStep(), position_ids="renumber")
    eng.begin_sample(STEPS)
    eng.recorder.start_sample()
    out = eng.forward(seq, 0, rows)
    assert out.keep is None  # nothing dropped inside the acting forward
    assert torch.equal(out.logits, ref_logits)

    seq.response_ids[[1, 5]] = out.logits[[1, 5]].argmax(-1)  # the step's unmasking
    keep, embeds = eng.after_step(seq, 0)
    assert embeds is None
    n_vis = seq.n_visual()
    assert int((seq.roles[keep] == Roles.VISUAL).sum()) == int(n_vis * ratio)
    assert set(torch.nonzero(seq.roles == Roles.TEXT).squeeze(1).tolist()) <= set(keep.tolist())
    seq1 = seq.keep_prompt(keep)

    out1 = eng.forward(seq1, 1, rows)
    assert out1.keep is None
    with torch.no_grad():
        h = torch.cat([seq.prompt_embeds[keep], tiny_model.embed_tokens(seq.response_ids)])[None]
        cos_sin = tiny_model.rotary_emb(h, torch.arange(h.shape[1])[None])
        for layer in tiny_model.layers:
            h = layer(h, attention_mask=None, position_embeddings=cos_sin)
        ref1 = tiny_model.lm_head(tiny_model.norm(h[:, -seq.gen_length:]))[0].float()
    torch.testing.assert_close(out1.logits, ref1, rtol=1e-5, atol=1e-5)
    assert eng.after_step(seq1, 1) is None  # first_step: acts once


def test_generation_schedule_and_scoring_flops(tiny_model, doc_images):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    ratio = 0.25
    gen = Generator(tiny_model, RedVTP(ratio=ratio), FirstStep(),
                    GenPreset(gen_length=GEN, block_length=GEN, steps=STEPS, think=None, stop=[]),
                    position_ids="renumber")
    gen.generate("What is the date?", [doc_images[0]])
    rec = gen.recorder.samples[-1]
    n_vis, T = rec.n_visual, tiny_model.num_layers
    kept = int(n_vis * ratio)
    for step in range(STEPS):
        for layer in range(T):
            assert rec.kept_by_step_layer[(step, layer)] == (n_vis if step == 0 else kept), (step, layer)
    n_full = rec.baseline_forwards.most_common(1)[0][0]
    assert rec.layer_calls == {(n_full, n_full): T, (n_full - n_vis + kept, n_full - n_vis + kept): (STEPS - 1) * T}
    # scoring: the GEN masked rows of step 0 against all n_full keys, in every layer
    cfg = tiny_model.llm_config
    heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    assert rec.scoring_flops == T * 2 * heads * GEN * n_full * hd


def test_ratio_one_reproduces_unpruned_output(tiny_model, doc_images):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    preset = GenPreset(gen_length=16, block_length=8, steps=4, think=None, stop=[])  # two blocks
    base = Generator(tiny_model, NoPruning(), FirstStep(), preset)
    full = Generator(tiny_model, RedVTP(ratio=1.0), FirstStep(), preset, position_ids="renumber")
    a = base.generate("What is the total?", [doc_images[1]], sample_id=1)
    b = full.generate("What is the total?", [doc_images[1]], sample_id=1)
    assert base.recorder.current.output_ids == full.recorder.current.output_ids
    assert a == b
    rec = full.recorder.current
    assert set(rec.kept_by_step_layer.values()) == {rec.n_visual}
    assert rec.scoring_flops > 0  # it did score (and kept every token)


def test_skips_when_no_masked_response_remains(tiny_model, seq_factory):
    for query_set in ("masked_response", "response"):
        seq = seq_factory()
        eng = Engine(tiny_model, RedVTP(ratio=0.5, query_set=query_set), FirstStep(), position_ids="renumber")
        eng.recorder.start_sample()
        eng.forward(seq, 0, torch.arange(seq.gen_length))
        seq.response_ids[:] = 300  # the step unmasked every slot
        assert eng.after_step(seq, 0) is None


def test_config_and_options():
    from dvlm_exp.run.build import build_pruner, compose_config

    cfg = compose_config(["prune=redvtp"])
    assert cfg.prune.position_ids == "renumber" and "layer" not in cfg.prune
    m = build_pruner(cfg)
    assert isinstance(m, RedVTP)
    assert (m.ratio, m.rounding, m.query_set) == (float(cfg.ratio), "floor", "masked_response")
    with pytest.raises(ValueError):
        RedVTP(ratio=0.5, query_set="all")
