"""RedVTP-LaViDa's code (Blacktower27/RedVTP-LaViDa) vs our prune=redvtp on the tiny LaViDa-LLaDA.

Re-stated from llava/model/language_model/llada/generate.py `generate` (read, not copied), the branch
the authors' evaluation runs (prefix_lm=False; with prefix_lm=True the code never prunes):
  - one block: `block_length = max_new_tokens` is forced; tokens per step: LLaDA's
    get_num_transfer_tokens (base + remainder on the first steps);
  - block 0, step 0: one forward with output_attentions; `stack(attentions).mean(dim=(0, 2))` =
    the mean over ALL layers and heads of the per-head softmax maps; the low-confidence transfer of
    that step; then the rows still masked (`x == mask_id`) average their attention to the image span
    -> importance; keep `max(1, int(N * 0.5))` by topk, indices sorted; every sequence-aligned
    tensor is sliced (positions then default: renumbered);
  - every later step runs on the shortened sequence.
One deliberate difference: the committed code has the line that writes the prompt's embeddings into
the step input commented out (`# inputs_embeds_curr[:, :inputs_embeds.shape[1]] = inputs_embeds`),
so its model sees token 0 at every prompt position, image included; LaViDa's own generate.py has the
line. The reference here keeps it (the evident intent); see docs/decisions.md.
The forward is written out from the checkpoint tensors by their official names (tests/test_lavida.py).
Ours: conf/prune/redvtp.yaml's options (query_set masked_response, floor, renumber) with
schedule=first_step and block_length = gen_length, as the code forces.
"""

from __future__ import annotations

import math

import pytest
import torch

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.pruning.redvtp import RedVTP
from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig
from dvlm_exp.schedules.first_step import FirstStep
from test_lavida import NAMES, SPECS, ckpts, models, noise_image, one_thread, rms, rope, stored  # noqa: F401


def naive_forward(W: dict, emb: torch.Tensor, n_heads: int, n_kv: int):
    """LaViDa-LLaDA forward by hand (bidirectional): (per-layer head-mean attention [n, n] list, logits [n, V])."""
    N = NAMES["llada"]
    h = emb.float()
    n, d = h.shape
    dh = d // n_heads
    pos = torch.arange(n)  # default positions (the code slices and lets them default)
    maps, i = [], 0
    while (N["block"].format(i=i) + N["q"] + ".weight") in W:
        b = N["block"].format(i=i)

        def lin(name, x):
            y = x @ W[b + name + ".weight"].T
            return y + W[b + name + ".bias"] if (b + name + ".bias") in W else y

        x = rms(h, W[b + N["attn_norm"] + ".weight"], N["eps"])
        q = lin(N["q"], x).view(n, n_heads, dh).transpose(0, 1)
        k = lin(N["k"], x).view(n, n_kv, dh).transpose(0, 1)
        v = lin(N["v"], x).view(n, n_kv, dh).transpose(0, 1)
        q, k = rope(q, pos, N["theta"]), rope(k, pos, N["theta"])
        rep = n_heads // n_kv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), -1)
        maps.append(att)
        h = h + lin(N["o"], (att @ v).transpose(0, 1).reshape(n, d))
        x = rms(h, W[b + N["mlp_norm"] + ".weight"], N["eps"])
        h = h + lin(N["down"], torch.nn.functional.silu(lin(N["gate"], x)) * lin(N["up"], x))
        i += 1
    return maps, rms(h, W[N["final_norm"]], N["eps"]) @ W[N["head"]].T


def code_generate(W, m, prompt_embeds, vis_start, n_vis, G, steps, ratio):
    """generate.py's loop, non-prefix branch, temperature 0, low_confidence: (answer ids, kept image indices)."""
    dims, V = m.dims(), m.lm_head.out_features
    mask_id = m.mask_id
    x = torch.full((G,), mask_id, dtype=torch.long)
    nt = [G // steps + (1 if s < G % steps else 0) for s in range(steps)]
    P_emb, kept = prompt_embeds.float(), None
    for i in range(steps):
        is_mask = x == mask_id
        if not bool(is_mask.any()):
            continue
        emb = torch.cat([P_emb, W[NAMES["llada"]["embed"]][x].float()])
        maps, logits = naive_forward(W, emb, dims["heads"], dims["kv_heads"])
        P = P_emb.shape[0]
        lg = logits[P:, :V]
        x0 = lg.argmax(-1)
        p = torch.softmax(lg.double(), -1).gather(-1, x0[:, None]).squeeze(-1)
        conf = torch.where(is_mask, p, torch.tensor(-math.inf, dtype=torch.float64))
        sel = torch.topk(conf, nt[i]).indices
        x[sel] = x0[sel]
        if i == 0 and kept is None:
            remask = P + torch.nonzero(x == mask_id).squeeze(1)
            if remask.numel():
                attn = torch.stack([a for a in maps]).mean(dim=(0, 1))  # layers x heads
                imp = attn[remask][:, vis_start:vis_start + n_vis].mean(0)
                keep_n = max(1, int(n_vis * ratio))
                kept = torch.topk(imp, keep_n).indices.sort().values
                keep = torch.ones(P, dtype=torch.bool)
                keep[vis_start:vis_start + n_vis] = False
                keep[vis_start + kept] = True
                P_emb = P_emb[keep]
    return x.tolist(), kept


@pytest.mark.parametrize("ratio,G,steps,img", [(0.5, 8, 4, 0), (0.5, 16, 8, 1), (0.25, 8, 8, 2), (0.35, 8, 4, 0)])
def test_redvtp_preset_equals_redvtp_lavida_code(ratio, G, steps, img, models, stored):  # noqa: F811
    m = models["llada"]
    W = {k: v.float() for k, v in stored["llada"].items()}
    image = noise_image(500 - 60 * img, 300 + 40 * img, seed=img)
    seq, info = m.prepare(m.prompt_ids("What is the total?", n_images=1), [image], G)
    vis = torch.nonzero(seq.roles[: seq.prompt_embeds.shape[0]] == Roles.VISUAL).squeeze(1)
    vis_start, n_vis = int(vis[0]), vis.numel()
    assert torch.equal(vis, torch.arange(vis_start, vis_start + n_vis))  # one span, as image_position
    want_ids, want_kept = code_generate(W, m, seq.prompt_embeds, vis_start, n_vis, G, steps, ratio)
    assert want_kept is not None and want_kept.numel() == max(1, int(n_vis * ratio))

    method = RedVTP(ratio=ratio)  # conf/prune/redvtp.yaml: masked_response, floor
    eng = Engine(m, method, FirstStep(), position_ids="renumber")
    eng.recorder.start_sample()
    sampler = MaskedDiffusionSampler(SamplerConfig(gen_length=G, block_length=G, steps=steps), m.banned_ids)
    out, final = sampler.generate(eng, seq, [])
    left = final.positions[final.roles == Roles.VISUAL]
    kept = torch.searchsorted(seq.positions[seq.roles == Roles.VISUAL], left)
    assert torch.equal(kept, want_kept), (kept.tolist(), want_kept.tolist())
    assert out == want_ids


def test_redvtp_lavida_sweep_is_the_codes_definition():
    """Every job of the redvtp_lavida sweep runs what the test above checks: one block, first step,
    the code's options, no Prefix-DLM cache."""

    from omegaconf import OmegaConf


    from dvlm_exp.run import sweep_jobs as sj
    jobs, _ = sj.expand("redvtp_lavida")
    cfgs = [OmegaConf.to_container(sj.compose(j), resolve=True) for j in jobs[:: max(1, len(jobs) // 3)]]
    for c in cfgs:
        assert c["model"]["name"] == "lavida_llada" and c["model"]["prefix_cache"] is False
        assert c["schedule"]["name"] == "first_step"
        assert c["task"]["gen"]["block_length"] == c["task"]["gen"]["gen_length"]
        assert (c["prune"]["name"], c["prune"]["query_set"], c["prune"]["rounding"], c["prune"]["position_ids"]) == (
            "redvtp", "masked_response", "floor", "renumber")
