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
from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig, num_transfer_tokens


def official_stop_scan(gen, stop_seqs, P, stop_position, found):
    """The official loop's stop search after a step: each sequence's first match, the scan ending
    after the first sequence once a stop is known. Returns (stop_position, found)."""
    for s in stop_seqs:
        for st in range(len(gen) - len(s) + 1):
            if gen[st:st + len(s)] == s:
                if not found or P + st < stop_position:
                    stop_position, found = P + st, True
                break
        if found:
            break
    return stop_position, found


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
            stop_position, found = official_stop_scan(x[P:P + gen_length].tolist(), stop_seqs, P, stop_position, found)
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


# ------------------------------------------------------------------ scripted-logit sampler tests
# A fake engine returns chosen logits per step, so the sampler's arithmetic (Gumbel noise,
# top-k over confidence, the stop rule) can be checked on inputs a real model rarely produces.
# The references below re-state the official LLaDA `generate` loop over the whole sequence
# (prompt rows included) with the scripted logits in place of the model.


class ScriptedEngine:
    """forward(seq, step, rows) -> the step's scripted answer logits [G, V] at `rows`."""

    def __init__(self, table):
        self.table = table  # [steps, G, V] float32

    def forward(self, seq, step, rows):
        from dvlm_exp.engine.engine import ForwardOut

        return ForwardOut(logits=self.table[step][rows].clone(), keep=None)


def scripted_seq(P, G, mask_id, d=4):
    from dvlm_exp.engine.state import Sequence

    return Sequence(prompt_embeds=torch.zeros(P, d), roles=torch.zeros(P, dtype=torch.int8),
                    positions=torch.arange(P), response_ids=torch.full((G,), mask_id), prompt_len0=P,
                    mask_id=mask_id)


def official_scripted(table, P, gen_length, block_length, steps, mask_id, temperature=0.0, stop_seqs=()):
    """LLaDA's generate loop, literally, with logits[t] = [P rows of zeros ; table[t]].

    Gumbel noise as the official `add_gumbel_noise`: float64 logits, one float64
    torch.rand_like over the whole (1, L, V) logits, exp(logits) / (-log u) ** T.
    Returns the final x over the answer, the answer cut at the stop, the per-step selections
    and how many selected slots were not masked any more (the official loop leaves those as they are).
    """
    G, V = gen_length, table.shape[-1]
    L = P + G
    x = torch.full((1, L), mask_id)
    x[0, :P] = 0  # prompt ids: never compared with mask_id (mask_id is out of the vocabulary)
    nb = G // block_length
    spb = steps // nb
    stop_position, found = L, False
    t, trace, overwrites = 0, [], 0
    for b in range(nb):
        bs, be = P + b * block_length, P + (b + 1) * block_length
        if found and stop_position <= bs:
            break
        n = int((x[0, bs:be] == mask_id).sum())
        ks = [n // spb + (1 if i < n % spb else 0) for i in range(spb)]
        for i in range(spb):
            mask_index = x == mask_id
            if found and not mask_index[0, P:stop_position].any():
                break
            if not mask_index[0, bs:be].any():
                break
            logits = torch.cat([torch.zeros(P, V), table[t]])[None]  # [1, L, V]
            if temperature > 0:
                lg = logits.to(torch.float64)
                noise = torch.rand_like(lg, dtype=torch.float64)
                noisy = lg.exp() / (-torch.log(noise)) ** temperature
            else:
                noisy = logits
            x0 = torch.argmax(noisy, dim=-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, stop_position if found else be:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-np.inf, dtype=x0_p.dtype))
            transfer = torch.topk(confidence[0], k=ks[i]).indices
            overwrites += int((~mask_index[0, transfer]).sum())
            x[0, transfer] = x0[0, transfer]
            trace.append(sorted((transfer - P).tolist()))
            t += 1
            stop_position, found = official_stop_scan(x[0, P:].tolist(), stop_seqs, P, stop_position, found)
    end = stop_position if found else L
    return x[0, P:].tolist(), x[0, P:end].tolist(), trace, overwrites


def run_scripted(table, P, G, block, steps, mask_id, temperature=0.0, stops=()):
    seq = scripted_seq(P, G, mask_id)
    cfg = SamplerConfig(gen_length=G, block_length=block, steps=steps, temperature=temperature)
    trace = []
    out, final = MaskedDiffusionSampler(cfg, []).generate(ScriptedEngine(table), seq, [list(s) for s in stops],
                                                           trace=trace)
    return final.response_ids.tolist(), out, trace


@pytest.mark.parametrize("gen,block,steps,temperature", [(16, 16, 4, 1.0), (16, 8, 4, 0.7), (12, 12, 3, 0.5)])
def test_gumbel_noise_is_float64_for_large_logits(gen, block, steps, temperature):
    """Catches Gumbel noise computed in float32 (exp of the logits or the uniforms): logits of
    100-120 overflow exp in float32 (> ~88.7), so every noisy score becomes inf and the argmax
    collapses to token 0. Reference: the official float64 add_gumbel_noise over a (1, L, V)
    rand_like per step, with the same seed."""
    P, V, mask_id = 5, 50, 999
    g = torch.Generator().manual_seed(gen * 100 + steps)
    table = 100.0 + 20.0 * torch.rand(steps, gen, V, generator=g)
    torch.manual_seed(3)
    ref_x, ref_out, ref_trace, _ = official_scripted(table, P, gen, block, steps, mask_id, temperature)
    torch.manual_seed(3)
    ids, out, trace = run_scripted(table, P, gen, block, steps, mask_id, temperature)
    assert ids == ref_x and out == ref_out
    assert trace == ref_trace
    assert len(set(out)) > 3  # the noise really picks varied tokens (an all-inf argmax gives only token 0)
    # and it is noise: greedy decoding of the same logits gives other tokens
    greedy, _, _ = run_scripted(table, P, gen, block, steps, mask_id, 0.0)
    assert greedy != out


def stop_table(G, V, steps, plan, seed):
    """Random logits per step; plan[t] = {slot: token} gets a logit of +30 (committed at step t)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(steps, G, V, generator=g)
    table[..., STOP] = -30.0  # the stop token only where the plan puts it
    for t, slots in plan.items():
        for j, tok in slots.items():
            table[t, j, tok] = 30.0
    return table


STOP = 7
STOP_PLANS = {
    # 16 slots, 4 steps, k = 4: the tail first, then the stop at slot 4 with three slots before it;
    # at step 3 one masked slot remains before the stop, so top-4 also picks three committed slots.
    "16_16_4": (16, 16, 4, {0: {12: 20, 13: 21, 14: 22, 15: 23}, 1: {8: 24, 9: 25, 10: 26, 11: 27},
                            2: {0: 28, 1: 29, 2: 30, 4: STOP}}),
    # 12 slots, 3 steps, k = 4: the tail, then the stop at slot 3 (with slots 0, 1, 5); at step 2
    # only slot 2 is masked before the stop.
    "12_12_3": (12, 12, 3, {0: {8: 20, 9: 21, 10: 22, 11: 23}, 1: {0: 24, 1: 25, 3: STOP, 5: 26}}),
}


@pytest.mark.parametrize("case", list(STOP_PLANS))
def test_stop_with_several_tokens_per_step_keeps_committed_slots(case):
    """Catches `ids[sel] = x0[sel]` (instead of keeping non-masked selected slots): after a stop,
    fewer masked slots than k can remain before it and top-k then selects committed slots too;
    the official loop leaves those tokens as they are. With no prompt (P = 0) the official
    confidence vector is exactly the answer's, so even top-k's ties pick the same slots and
    the whole state and the selections can be compared."""
    G, block, steps, plan = STOP_PLANS[case]
    V, mask_id = 32, 999
    for seed in range(3):
        table = stop_table(G, V, steps, plan, seed)
        ref_x, ref_out, ref_trace, overwrites = official_scripted(table, 0, G, block, steps, mask_id,
                                                                  stop_seqs=[[STOP]])
        assert overwrites > 0  # the case under test happens: committed slots are selected
        ids, out, trace = run_scripted(table, 0, G, block, steps, mask_id, stops=[[STOP]])
        assert out == ref_out and len(out) < G
        assert ids == ref_x, seed
        assert trace == ref_trace
        # every committed token is the one chosen when it was committed (the plan's tokens)
        for slots in plan.values():
            for j, tok in slots.items():
                assert ids[j] == tok
