"""Engine + FastV against naive references on the tiny model.

The references compute the full softmax attention matrix explicitly (eager, every head,
every query) and run the decoder layers by hand, so a bug in the score rows, the gather,
the position policy or the persistence across steps shows up as a mismatch.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.pruning.base import keep_count
from dvlm_exp.pruning.fastv import QUERY_SETS, FastV
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.schedules.at_step import AtStep
from dvlm_exp.schedules.first_step import FirstStep


@pytest.fixture(scope="module")
def seq_factory(tiny_model, doc_images):
    def make(gen_length=8, image=0, commit=()):
        ids = tiny_model.prompt_ids("What is the total?", n_images=1, think="no_think")
        seq, _ = tiny_model.prepare(ids, [doc_images[image]], gen_length)
        for j, tok in commit:  # some answer slots already decoded
            seq.response_ids[j] = tok
        return seq

    return make


def naive_attention_matrix(model, seq, layer_idx: int) -> torch.Tensor:
    """Head-mean softmax attention [n, n] of layer `layer_idx` on the unpruned sequence, by hand."""
    with torch.no_grad():
        h = torch.cat([seq.prompt_embeds, model.embed_tokens(seq.response_ids)])[None]
        pos = torch.arange(h.shape[1])[None]
        cos, sin = model.rotary_emb(h, pos)
        for layer in model.layers[:layer_idx]:
            h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
        attn = model.layers[layer_idx].self_attn
        x = model.layers[layer_idx].input_layernorm(h)
        n, hd = x.shape[1], attn.head_dim
        q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        probs = torch.softmax((q @ k.transpose(-1, -2)) / hd ** 0.5, dim=-1)  # [1, h, n, n]
        return probs[0].mean(0)


def naive_queries(query_set: str, roles: torch.Tensor, is_mask: torch.Tensor) -> list[int]:
    n = roles.numel()
    resp = [i for i in range(n) if roles[i] == Roles.RESPONSE]
    if query_set == "last_token":
        return [n - 1]
    if query_set == "all":
        return list(range(n))
    if query_set == "last_prompt_token":
        return [resp[0] - 1]
    masked = [r for j, r in enumerate(resp) if is_mask[j]]
    return masked or resp


def naive_fastv_keep(A, roles, query_rows, ratio) -> list[int]:
    vis = [i for i in range(roles.numel()) if roles[i] == Roles.VISUAL]
    score = {i: sum(float(A[q, i]) for q in query_rows) / len(query_rows) for i in vis}
    k = keep_count(len(vis), ratio)
    ranked = sorted(range(len(vis)), key=lambda j: -score[vis[j]])
    return sorted(ranked[:k])


@pytest.mark.parametrize("query_set", QUERY_SETS)
def test_fastv_selection_matches_naive_full_attention(tiny_model, seq_factory, query_set):
    K, ratio = 2, 0.3
    seq = seq_factory(commit=[(0, 300), (3, 301)])  # masked and unmasked answer slots
    A = naive_attention_matrix(tiny_model, seq, K - 1)
    roles = seq.all_roles()
    q = naive_queries(query_set, roles, seq.is_mask)
    expected = naive_fastv_keep(A, roles, q, ratio)

    method = FastV(ratio=ratio, layer=K, query_set=query_set)
    eng = Engine(tiny_model, method, FirstStep())
    eng.recorder.start_sample()
    out = eng.forward(seq, step=0, response_rows=torch.arange(seq.gen_length))
    kept_vis = torch.nonzero(seq.roles[out.keep] == Roles.VISUAL).squeeze(1)
    vis_positions = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    kept_visual_idx = torch.searchsorted(vis_positions, out.keep[seq.roles[out.keep] == Roles.VISUAL])
    assert kept_visual_idx.tolist() == expected
    assert len(kept_vis) == keep_count(seq.n_visual(), ratio)
    # every non-visual prompt token survives
    assert set(torch.nonzero(seq.roles == Roles.TEXT).squeeze(1).tolist()) <= set(out.keep.tolist())


def test_score_rows_equal_naive_columns(tiny_model, seq_factory):
    from dvlm_exp.engine.attention import ScoreRequest

    seq = seq_factory()
    A = naive_attention_matrix(tiny_model, seq, 1)
    rows = torch.tensor([0, 5, seq.length - 1])
    req = ScoreRequest(rows)
    h = torch.cat([seq.prompt_embeds, tiny_model.embed_tokens(seq.response_ids)])[None]
    cos_sin = tiny_model.rotary_emb(h, torch.arange(h.shape[1])[None])
    with torch.no_grad():
        h = tiny_model.layers[0](h, attention_mask=None, position_embeddings=cos_sin)
        out_with = tiny_model.layers[1](h, attention_mask=None, position_embeddings=cos_sin, dvlm_score=req)
        out_without = tiny_model.layers[1](h, attention_mask=None, position_embeddings=cos_sin)
    torch.testing.assert_close(req.column_mean, A[rows].mean(0), rtol=1e-5, atol=1e-7)
    assert torch.equal(out_with, out_without)  # scoring never changes the layer output (SDPA kept)
    assert req.n_rows == 3 and req.n_keys == seq.length


@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_pruned_forward_matches_manual_gather(tiny_model, seq_factory, policy):
    """Layers < K see all tokens, layers >= K the survivors with the configured positions."""
    K, ratio = 2, 0.4
    seq = seq_factory()
    method = FastV(ratio=ratio, layer=K, query_set="all")
    eng = Engine(tiny_model, method, FirstStep(), position_ids=policy)
    eng.recorder.start_sample()
    rows = torch.arange(seq.gen_length)
    out = eng.forward(seq, 0, rows)
    keep = torch.cat([out.keep, seq.prompt_embeds.shape[0] + rows])
    with torch.no_grad():
        h = torch.cat([seq.prompt_embeds, tiny_model.embed_tokens(seq.response_ids)])[None]
        cos, sin = tiny_model.rotary_emb(h, torch.arange(h.shape[1])[None])
        for layer in tiny_model.layers[:K]:
            h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
        h = h[:, keep]
        if policy == "keep":
            cos, sin = cos[:, keep], sin[:, keep]
        else:
            cos, sin = tiny_model.rotary_emb(h, torch.arange(h.shape[1])[None])
        for layer in tiny_model.layers[K:]:
            h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
        ref = tiny_model.lm_head(tiny_model.norm(h[:, -seq.gen_length:]))[0].float()
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


def test_ratio_one_is_identical_to_no_pruning(tiny_model, doc_images):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    preset = GenPreset(gen_length=16, block_length=8, steps=8)
    base = Generator(tiny_model, NoPruning(), FirstStep(), preset)
    full = Generator(tiny_model, FastV(ratio=1.0, layer=2, query_set="last_token"), FirstStep(), preset)
    for i, img in enumerate(doc_images):
        a = base.generate("What is the total?", [img], sample_id=i)
        b = full.generate("What is the total?", [img], sample_id=i)
        assert base.recorder.current.output_ids == full.recorder.current.output_ids
        assert a == b


def test_persistence_later_steps_see_pruned_sequence(tiny_model, doc_images):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    K, ratio, steps = 2, 0.25, 4
    for schedule, act in ((FirstStep(), 0), (AtStep(step=2), 2)):
        gen = Generator(tiny_model, FastV(ratio=ratio, layer=K), schedule, GenPreset(gen_length=8, block_length=8, steps=steps))
        gen.generate("What is the date?", [doc_images[0]])
        rec = gen.recorder.current
        n_vis = rec.n_visual
        kept = keep_count(n_vis, ratio)
        T = tiny_model.num_layers
        for step in range(steps):
            for layer in range(T):
                expect = n_vis if (step < act or (step == act and layer < K)) else kept
                assert rec.kept_by_step_layer[(step, layer)] == expect, (schedule, step, layer)
        # the sequence length each layer processed follows the same pattern
        n_full = rec.baseline_forwards.most_common(1)[0][0]
        pruned_calls = sum(c for (nq, _), c in rec.layer_calls.items() if nq == n_full - (n_vis - kept))
        assert pruned_calls == (T - K) + (steps - act - 1) * T


def test_random_pruning_is_seeded_and_sized(tiny_model, doc_images):
    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.pruning.random import RandomPruning

    outs = []
    for _ in range(2):
        gen = Generator(tiny_model, RandomPruning(ratio=0.5, layer=0, seed=3), FirstStep(), GenPreset(gen_length=8, block_length=8, steps=4))
        gen.generate("What is the date?", [doc_images[1]], sample_id=5)
        rec = gen.recorder.current
        assert rec.kept_by_step_layer[(0, 0)] == keep_count(rec.n_visual, 0.5)
        outs.append(rec.output_ids)
    assert outs[0] == outs[1]


def test_vision_tower_runs_once_per_sample(tiny_model, doc_images):
    """Issue 8: the visual tokens are computed once per sample (all views in one batch), not once
    per denoising step, pruned or not."""
    from dvlm_exp.decoding.generator import GenPreset, Generator

    calls = []
    handle = tiny_model.vision_tower.embeddings.register_forward_hook(lambda _m, inp, _out: calls.append(inp[0].shape[0]))
    try:
        preset = GenPreset(gen_length=16, block_length=8, steps=8)
        for method in (NoPruning(), FastV(ratio=0.35, layer=2, query_set="masked_response")):
            calls.clear()
            g = Generator(tiny_model, method, FirstStep(), preset)
            g.generate("What is the total?", [doc_images[0]], sample_id=0)
            assert g.recorder.current.n_forwards == 8  # eight forwards of the decoder ...
            assert len(calls) == 1 and calls[0] > 1  # ... one batched tower call for every view
    finally:
        handle.remove()


def test_jobs_sharing_a_model_config_reuse_the_loaded_model(tiny_cfg):
    """Issue 8: in a multirun on one machine (Hydra's basic launcher), jobs that differ only in
    method, ratio, schedule or task get the model already in memory; another model config loads anew."""
    from omegaconf import OmegaConf

    from dvlm_exp.run.build import load_model

    a = load_model(tiny_cfg)
    other_job = OmegaConf.merge(tiny_cfg, {"ratio": 0.1, "prune": {"name": "random", "layer": 1}})
    assert load_model(other_job) is a
    other_model = OmegaConf.merge(tiny_cfg, {"model": {"dtype": "bfloat16"}})
    b = load_model(other_model)
    assert b is not a and next(b.parameters()).dtype == torch.bfloat16
    assert load_model(tiny_cfg) is not b  # one model in memory at a time: the first is loaded again


def test_lm_head_fast_path_equals_the_linear_and_follows_weight_changes():
    """The answer-row head (oneDNN, weight reordered once) against the plain nn.Linear: equal to
    float32 rounding for 1-64 rows, bit-identical above 64 rows (the plain path, where the golden
    logits are compared), re-packed after an in-place weight change, and seen by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from dvlm_exp.engine import engine as eng

    torch.manual_seed(0)
    head = torch.nn.Linear(96, 5000, bias=False)
    x = torch.randn(1, 80, 96)
    with torch.inference_mode():
        for m in (1, 2, 7, 17, 32, 64):
            got, ref = eng._lm_head(head, x[:, :m]), head(x[:, :m])
            assert got.shape == ref.shape == (1, m, 5000)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
        assert torch.equal(eng._lm_head(head, x), head(x))  # 80 rows: the Linear itself
        before = eng._lm_head(head, x[:, :4])
        head.weight.mul_(-1.0)  # in place: same storage, new version
        after = eng._lm_head(head, x[:, :4])
    torch.testing.assert_close(after, -before, rtol=0, atol=0)
    torch.testing.assert_close(after, head(x[:, :4]).detach(), rtol=1e-5, atol=1e-5)
    xg = x[:, :3].clone().requires_grad_(True)  # gradients flow through the head as through the Linear
    eng._lm_head(head, xg).sum().backward()
    torch.testing.assert_close(xg.grad, head.weight.sum(0).expand_as(xg).detach(), rtol=1e-4, atol=1e-4)
    assert head.weight.grad is not None
    if eng._ONEDNN_HEAD:  # the fast path ran: its FLOPs are counted like the Linear's
        assert len(eng._PACKED_HEADS) >= 1
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            eng._lm_head(head, x[:, :17])
        assert fc.get_total_flops() == 2 * 17 * 96 * 5000


def naive_pruned_logits(model, prompt_embeds, prompt_pos, response_ids, prompt_len0):
    """Every layer on an explicitly pruned sequence: the kept prompt tokens at their original
    positions `prompt_pos`, answer slot j at prompt_len0 + j (answer-row logits)."""
    with torch.no_grad():
        h = torch.cat([prompt_embeds, model.embed_tokens(response_ids)])[None]
        pos = torch.cat([prompt_pos, prompt_len0 + torch.arange(response_ids.numel())])
        cos_sin = model.rotary_emb(h, pos[None])
        for layer in model.layers:
            h = layer(h, attention_mask=None, position_embeddings=cos_sin)
        return model.lm_head(model.norm(h[:, -response_ids.numel():]))[0].float()


def naive_fastv_first_step_generate(model, seq, K, ratio, query_set, steps):
    """Greedy low-confidence decoding (one block) with FastV at step 0, by hand: step 0 scores
    layer K-1 on the full sequence (naive attention matrix), runs layers >= K on the gathered
    tokens with their original positions; later steps run every layer on the explicitly pruned
    sequence (naive_pruned_logits). Returns the logits of every step and the final ids."""
    G, mask_id = seq.gen_length, seq.mask_id
    P0 = seq.prompt_embeds.shape[0]
    ids = torch.full((G,), mask_id)
    ks = [G // steps + (1 if i < G % steps else 0) for i in range(steps)]
    roles = seq.all_roles()
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    step_logits = []
    keep_prompt = None
    for t in range(steps):
        if t == 0:
            cur = replace(seq, response_ids=ids.clone())
            A = naive_attention_matrix(model, cur, K - 1)
            kept_vis = naive_fastv_keep(A, roles, naive_queries(query_set, roles, cur.is_mask), ratio)
            keep_mask = seq.roles != Roles.VISUAL
            keep_mask[vis[kept_vis]] = True
            keep_prompt = torch.nonzero(keep_mask).squeeze(1)
            keep_all = torch.cat([keep_prompt, P0 + torch.arange(G)])
            with torch.no_grad():
                h = torch.cat([seq.prompt_embeds, model.embed_tokens(ids)])[None]
                cos, sin = model.rotary_emb(h, torch.arange(P0 + G)[None])
                for layer in model.layers[:K]:
                    h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
                h, cos, sin = h[:, keep_all], cos[:, keep_all], sin[:, keep_all]
                for layer in model.layers[K:]:
                    h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
                logits = model.lm_head(model.norm(h[:, -G:]))[0].float()
        else:  # the original unpruned positions of the kept prompt tokens are their indices
            logits = naive_pruned_logits(model, seq.prompt_embeds[keep_prompt], keep_prompt, ids, P0)
        step_logits.append(logits.clone())
        masked = ids == mask_id
        for tid in model.banned_ids:
            logits[:, tid] = torch.where(masked, -float("inf"), logits[:, tid])
        x0 = logits.argmax(-1)
        conf = torch.softmax(logits.double(), -1).gather(-1, x0[:, None])[:, 0]
        conf[~masked] = -float("inf")
        sel = torch.topk(conf, ks[t]).indices
        ids[sel] = x0[sel]
    return step_logits, ids.tolist(), keep_prompt


def test_fastv_later_steps_keep_original_answer_positions(tiny_model, seq_factory):
    """position_ids=keep after first-step pruning that persists: at every later step the answer
    slots stay at prompt_len0 + j (not renumbered from the pruned length) and the kept prompt
    tokens at their original positions. Catches Sequence.all_positions numbering the answer from
    the current (pruned) prompt length: step 0 is unaffected, steps > 0 and the ids are not."""
    from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig

    K, ratio, G, steps = 2, 0.25, 8, 4
    seq = seq_factory(gen_length=G)
    ref_logits, ref_ids, ref_keep = naive_fastv_first_step_generate(tiny_model, seq, K, ratio, "last_token", steps)

    seen = []

    class Watched(Engine):
        def forward(self, s, step, rows):
            out = super().forward(s, step, rows)
            seen.append((s.prompt_embeds.shape[0], s.positions.clone(), out.logits.clone()))
            return out

    eng = Watched(tiny_model, FastV(ratio=ratio, layer=K, query_set="last_token"), FirstStep(), position_ids="keep")
    eng.recorder.start_sample()
    cfg = SamplerConfig(gen_length=G, block_length=G, steps=steps)
    ids, final = MaskedDiffusionSampler(cfg, tiny_model.banned_ids).generate(eng, seq)
    assert len(seen) == steps
    n_kept = ref_keep.numel()
    assert n_kept < seq.prompt_embeds.shape[0]  # the pruning persists: later steps run shortened
    for t, (n_prompt, positions, logits) in enumerate(seen):
        if t > 0:
            assert n_prompt == n_kept and torch.equal(positions, ref_keep)
        torch.testing.assert_close(logits, ref_logits[t], rtol=1e-5, atol=1e-5, msg=f"step {t}")
    assert ids == ref_ids
    assert torch.equal(final.all_positions()[-G:], seq.prompt_len0 + torch.arange(G))
