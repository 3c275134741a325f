"""The sampler against a straightforward re-implementation of LLaDA's generate_with_embeds.

The reference below follows the official loop literally: a full-length embedding tensor,
mask positions found by comparing embeddings with embed(mask_id), logits for every position,
a confidence vector over the whole sequence, stop sequences searched in the generated ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dvlm_exp.engine import Engine
from dvlm_exp.sampler import MaskedDiffusionSampler, SamplerConfig, num_transfer_tokens


def reference_generate(model, prompt_embeds, gen_length, block_length, steps, remasking, stop_seqs):
    mask_id = model.mask_id
    P = prompt_embeds.shape[0]
    L = P + gen_length
    m = model.embed_tokens(torch.tensor([mask_id]))
    x_emb = m.repeat(L, 1).clone()
    x_emb[:P] = prompt_embeds
    x = torch.full((L,), mask_id)
    nb = gen_length // block_length
    spb = steps // nb
    stop_position, found = P + gen_length, False
    trace = []
    cos_sin = model.rotary_emb(x_emb[None], torch.arange(L)[None])
    for b in range(nb):
        bs, be = P + b * block_length, P + (b + 1) * block_length
        if found and stop_position <= bs:
            break
        block_mask = torch.all((x_emb[bs:be] - m).abs() < 1e-5, dim=1)
        n = int(block_mask.sum())
        ks = [n // spb + (1 if i < n % spb else 0) for i in range(spb)]
        for i in range(spb):
            mask_index = torch.all((x_emb - m).abs() < 1e-5, dim=1)
            if found and not mask_index[P:stop_position].any():
                break
            if not mask_index[bs:be].any():
                break
            h = x_emb[None]
            for layer in model.layers:
                h = layer(h, attention_mask=None, position_embeddings=cos_sin)
            logits = model.lm_head(model.norm(h))[0].float()
            for tid in model.banned_ids:
                logits[:, tid] = torch.where(mask_index, -float("inf"), logits[:, tid])
            x0 = logits.argmax(-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.double(), -1)
                x0_p = p.gather(-1, x0[:, None])[:, 0]
            else:
                x0_p = torch.rand((1, L))[0]
            x0_p[stop_position if found else be:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.tensor(-np.inf, dtype=x0_p.dtype))
            sel = torch.topk(conf, k=ks[i]).indices
            x_emb[sel] = model.embed_tokens(x0[sel])
            x[sel] = x0[sel]
            trace.append(sorted((sel - P).tolist()))
            gen = x[P:P + gen_length].tolist()
            for s in stop_seqs:
                for st in range(len(gen) - len(s) + 1):
                    if gen[st:st + len(s)] == s:
                        if not found or P + st < stop_position:
                            stop_position, found = P + st, True
                        break
                if found:
                    break
    end = stop_position if found else P + gen_length
    return x[P:end].tolist(), trace


@pytest.fixture(scope="module")
def prompt(tiny_model):
    # Text-only prompt: sampling semantics do not depend on the image, and the literal
    # reference computes logits for every position (cheap only on a short sequence).
    ids = tiny_model.prompt_ids("What is the invoice number on the page?", n_images=0, think="no_think")
    seq, _ = tiny_model.prepare(ids, [], 16)
    return seq


def run_ours(model, seq, cfg, stops):
    import copy

    s = copy.copy(seq)
    eng = Engine(model)
    eng.recorder.start_sample()
    trace = []
    out, _ = MaskedDiffusionSampler(cfg, model.banned_ids).generate(eng, s, stops, trace=trace)
    return out, trace, eng.recorder.current.n_forwards


@pytest.mark.parametrize("gen,block,steps,remasking", [(16, 16, 8, "low_confidence"), (16, 8, 8, "low_confidence"),
                                                       (16, 4, 8, "random"), (12, 12, 5, "low_confidence")])
def test_matches_reference_step_by_step(tiny_model, prompt, gen, block, steps, remasking):
    from dataclasses import replace

    seq = replace(prompt, response_ids=torch.full((gen,), tiny_model.mask_id))
    cfg = SamplerConfig(gen_length=gen, block_length=block, steps=steps, remasking=remasking)
    if gen % block == 0 and steps % (gen // block) == 0:
        torch.manual_seed(11)
        ref, ref_trace = reference_generate(tiny_model, seq.prompt_embeds, gen, block, steps, remasking, [])
        torch.manual_seed(11)
        ours, trace, nfe = run_ours(tiny_model, seq, cfg, [])
        assert ours == ref
        assert trace == ref_trace
        assert nfe == steps
        # tokens committed per step: even split of each block over its steps
        spb = steps // (gen // block)
        assert [len(t) for t in trace] == num_transfer_tokens(block, spb) * (gen // block)


def test_stop_sequences_cut_and_match_reference(tiny_model, prompt):
    from dataclasses import replace

    gen, block, steps = 16, 8, 8
    seq = replace(prompt, response_ids=torch.full((gen,), tiny_model.mask_id))
    cfg = SamplerConfig(gen_length=gen, block_length=block, steps=steps)
    free, _, _ = run_ours(tiny_model, seq, cfg, [])
    # Stop on a token the model really produces in the first block, and on a 2-token sequence.
    for stops in ([[free[3]]], [[free[5], free[6]]], [[999999], [free[2]]]):
        ref, ref_trace = reference_generate(tiny_model, seq.prompt_embeds, gen, block, steps, "low_confidence", stops)
        ours, trace, nfe = run_ours(tiny_model, seq, cfg, stops)
        assert ours == ref and trace == ref_trace
        assert len(ours) < gen  # cut at the stop
        assert all(ours[i:i + len(s)] != s for s in stops for i in range(len(ours)))  # nothing after the first stop kept
        assert nfe <= steps


def test_banned_ids_never_generated(tiny_model, prompt):
    from dataclasses import replace

    gen = 16
    seq = replace(prompt, response_ids=torch.full((gen,), tiny_model.mask_id))
    # Make the banned ids the most likely tokens everywhere: they must still never be chosen.
    bias = torch.zeros(tiny_model.lm_head.out_features)
    bias[tiny_model.banned_ids] = 1e4
    head = torch.nn.Linear(tiny_model.lm_head.in_features, tiny_model.lm_head.out_features, bias=True)
    head.weight.data = tiny_model.lm_head.weight.data
    head.bias.data = bias
    import copy

    m = copy.copy(tiny_model)
    m._modules = dict(tiny_model._modules)
    m.lm_head = head
    out, _, _ = run_ours(m, seq, SamplerConfig(gen_length=gen, block_length=gen, steps=8), [])
    assert len(out) == gen and not set(out) & set(tiny_model.banned_ids)


def test_seeded_sampling_is_deterministic(tiny_model, prompt):
    from dataclasses import replace

    seq = replace(prompt, response_ids=torch.full((8,), tiny_model.mask_id))
    cfg = SamplerConfig(gen_length=8, block_length=8, steps=4, temperature=0.7, remasking="random", noise="answer")
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(run_ours(tiny_model, seq, cfg, [])[0])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("kw,msg", [(dict(gen_length=10, block_length=4), "divisible by block_length"),
                                    (dict(gen_length=8, block_length=4, steps=3), "divisible by the number of blocks"),
                                    (dict(remasking="top"), "remasking")])
def test_bad_sampler_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplerConfig(**kw).validate()
