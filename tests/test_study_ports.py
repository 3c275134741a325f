"""The dMLLM study's presets against the study's own LLaDA-V ports, on the golden tiny LLaDA-V.

The study's repository (Yrdal3910/dMLLM-Visual-Token-Redundancy-Analysis, commit 43849fe) holds its
ports as edited copies of LLaDA-V's `modeling_llada.py` whose imports (its `llava.cache`,
`llava_arch`, the LLaDA-V wrapper of each port) are only partly published, so the official code
cannot be run here. Each port is therefore re-stated naively below (plain torch, the weights of
the golden checkpoint, full attention matrices, no engine), following the cited file and function
line by line, and our engine + sampler with the `prune=study_*` preset must give the same kept
visual tokens (in the same order), the same output ids and the same per-step commits.

Inputs: the two golden LLaDA-V cases (tests/golden/llada_v, official prompt ids) and a third image
(a seeded textured portrait 320x480, the case_384x384 prompt: exercises the height-side unpad; flat
images such as a white document page give near-tied scores whose order float noise decides),
generation 16/8/8 and 8/8/4
(gen_length / block_length / steps, low-confidence greedy), keep 0.25 and 0.5.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from conftest import golden_dir
from dvlm_exp.engine import Engine
from dvlm_exp.engine.state import Roles
from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig
from dvlm_exp.schedules.at_step import AtStep

MASK_ID = 126336
BANNED = (126081, 126080, 126346, 126347)  # generate_with_embeds: set to -inf at masked positions
GENS = [(16, 8, 8), (8, 8, 4)]
RATIOS = [0.25, 0.5]
IMAGES = ["case_500x300", "case_384x384", "portrait_320x480"]


@pytest.fixture(scope="module")
def golden_model():
    from dvlm_exp.models.llada_v import LLaDAV

    return LLaDAV.from_pretrained(golden_dir() / "checkpoint", dtype="float32", device="cpu", load_tokenizer=False)


@pytest.fixture(scope="module")
def inputs():
    import numpy as np

    out = {}
    for case in ("case_500x300", "case_384x384"):
        d = golden_dir() / case
        out[case] = (json.loads((d / "input_ids.json").read_text()), Image.open(d / "image.png").convert("RGB"))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:320]
    arr = np.stack([xx * 200 // 319, yy * 200 // 479, (xx + yy) % 160], -1) + rng.integers(0, 56, (480, 320, 3))
    out["portrait_320x480"] = (out["case_384x384"][0], Image.fromarray(arr.astype(np.uint8), "RGB"))
    return out


def preset(name: str, ratio: float, **override):
    """The preset as run.py composes it (sweeps/prune/<name>.yaml over conf/prune/<method>.yaml)."""
    from omegaconf import OmegaConf

    from dvlm_exp.registry import PRUNERS
    from dvlm_exp.run.build import compose_config

    cfg = compose_config([f"prune={name}", f"ratio={ratio}"])
    p = OmegaConf.to_container(cfg.prune, resolve=True)
    p.update(override)
    position_ids = p.pop("position_ids")
    return PRUNERS.get(p.pop("name"))(ratio=ratio, seed=int(cfg.seed), **p), position_ids, p


# ----------------------------------------------------------------------------------------------
# Naive re-statement of the study's LLaDA-V forward (one LLaDADecoderLayer after another) with a
# hook where a port acts on the hidden states of one layer.

def _rope(positions: torch.Tensor, dh: int, theta: float):
    # LLaDARotaryEmbedding.forward: inv_freq over even dims, emb = cat(freqs, freqs), float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
    freqs = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rms(norm, x):
    v = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(v + norm.variance_epsilon))


def naive_forward(model, x_embeds: torch.Tensor, act=None):
    """x_embeds [L, d] -> final hidden [L', d]. `act(layer, h, score)` may return (h', True) after
    a layer's attention residual (the ports prune there; an `act` with `after_mlp = True` after
    the layer's MLP instead, SparseVLM's port); positions are then renumbered 0..L'-1
    (adjust_position_ids) for the following layers. An `act` with a `begin` sees the input first."""
    h = x_embeds.float()
    post = act is not None and getattr(act, "after_mlp", False)
    if act is not None and hasattr(act, "begin"):
        act.begin(h)
    theta = float(json.loads((golden_dir() / "checkpoint" / "config.json").read_text())["rope_theta"])
    positions = torch.arange(h.shape[0])
    for li, layer in enumerate(model.layers):
        at = layer.self_attn
        nh = at.config.num_attention_heads
        nkv = at.config.num_key_value_heads
        dh = at.head_dim
        x = _rms(layer.input_layernorm, h)
        q = (x @ at.q_proj.weight.T).view(-1, nh, dh).transpose(0, 1)
        k = (x @ at.k_proj.weight.T).view(-1, nkv, dh).transpose(0, 1)
        v = (x @ at.v_proj.weight.T).view(-1, nkv, dh).transpose(0, 1)
        cos, sin = _rope(positions, dh, theta)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        logits = q @ k.transpose(-2, -1) * (1 / math.sqrt(dh))  # [h, L, L], no mask (bidirectional)
        score = torch.softmax(logits.mean(0), dim=-1)  # the FastV port's attn_score (no bias)
        out = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(h.shape[0], nh * dh)
        h = h + out @ at.o_proj.weight.T
        if act is not None and not post:
            h2, pruned = act(li, h, score)
            if pruned:
                h = h2
                positions = torch.arange(h.shape[0])
        m = layer.mlp
        y = _rms(layer.post_attention_layernorm, h)
        h = h + (torch.nn.functional.silu(y @ m.gate_proj.weight.T) * (y @ m.up_proj.weight.T)) @ m.down_proj.weight.T
        if post:
            h2, pruned = act(li, h, score)
            if pruned:
                h = h2
                positions = torch.arange(h.shape[0])
    return _rms(model.norm, h)


GAP: dict = {}


@torch.no_grad()
def naive_generate(model, prompt_embeds, s: int, nv: int, gen: int, block: int, steps: int, act_factory):
    """generate_with_embeds of the study's ports (low_confidence, temperature 0, no cfg / suffix /
    stop words). `act_factory(step)` gives the forward's layer hook (or None); when it prunes, it
    returns the kept visual indices, which are then applied to the persistent embeddings (as the
    port does after the forward with VISUAL_INDICES). Returns (answer ids, commits per step, kept)."""
    masked = model.embed_tokens(torch.tensor([MASK_ID]))[0].float()
    x_emb = torch.cat([prompt_embeds.float(), masked.expand(gen, -1)])
    x = torch.full((x_emb.shape[0],), MASK_ID, dtype=torch.long)
    P = prompt_embeds.shape[0]
    trace, kept, step = [], None, 0
    spb = steps // (gen // block)
    for b in range(gen // block):
        lo, hi = P + b * block, P + (b + 1) * block
        n_mask = int(torch.all(torch.abs(x_emb[lo:hi] - masked) < 1e-5, dim=1).sum())
        ntt = [n_mask // spb + (1 if i < n_mask % spb else 0) for i in range(spb)]
        for i in range(spb):
            mask_index = torch.all(torch.abs(x_emb - masked) < 1e-5, dim=1)
            if not bool(mask_index[lo:hi].any()):
                break
            act, box = act_factory(step)
            hid = naive_forward(model, x_emb, act)
            step += 1
            if box.get("gap") is not None:
                GAP["last"] = box["gap"]
            if box.get("keep") is not None:  # the forward pruned: shorten the persistent state
                idx = box["keep"]
                kept = idx.tolist()
                x_emb = torch.cat([x_emb[:s], x_emb[s:s + nv][idx], x_emb[s + nv:]])
                x = torch.cat([x[:s], x[s:s + nv][idx], x[s + nv:]])
                P -= nv - idx.numel()
                nv = idx.numel()
                lo, hi = P + b * block, P + (b + 1) * block
                mask_index = torch.all(torch.abs(x_emb - masked) < 1e-5, dim=1)
            # logits only at the answer rows: prompt rows are never masked, so never selected (rows the
            # forward added, SparseVLM's merged tokens, sit before them: the port cuts them out)
            logits = (hid[hid.shape[0] - (x_emb.shape[0] - P):] @ model.lm_head.weight.T).float()
            mi = mask_index[P:]
            for t in BANNED:
                logits[:, t] = torch.where(mi, -float("inf"), logits[:, t])
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.double(), dim=-1)
            x0_p = torch.gather(p, -1, x0[:, None])[:, 0]
            x0_p[hi - P:] = -float("inf")
            conf = torch.where(mi, x0_p, torch.full_like(x0_p, -float("inf")))
            sel = torch.topk(conf, k=ntt[i]).indices
            x[P + sel] = x0[sel]
            x_emb[P + sel] = model.embed_tokens(x0[sel]).float()
            trace.append(sorted(sel.tolist()))
    return x[P:P + gen].tolist(), trace, kept


def run_ours(model, ids, img, gen, block, steps, method, position_ids, at_step):
    seq, _ = model.prepare(ids, [img], gen_length=gen)
    eng = Engine(model, method, AtStep(at_step), position_ids=position_ids)
    eng.recorder.start_sample()
    sampler = MaskedDiffusionSampler(SamplerConfig(gen_length=gen, block_length=block, steps=steps), model.banned_ids)
    trace: list = []
    out, seq1 = sampler.generate(eng, seq, trace=trace)
    s = int(torch.nonzero(seq.roles == Roles.VISUAL)[0])
    kept = (seq1.positions[seq1.roles == Roles.VISUAL] - s).tolist()
    return out, trace, kept, seq


# ----------------------------------------------------------------------------------------------
# FastV: LLaDA-V/eval/llava_fastv/model/language_model/modeling_llada.py
#   scaled_dot_product_attention: attn_score = softmax(mean over heads of q k^T / sqrt(dh)) (no bias)
#   LLaDADecoderLayer.forward at FASTV_PRUNING_LAYER (after the attention residual, before the MLP):
#     token_attention = attn_scores[:, :, s:s+nv].sum(dim=1)  (every query row)
#     topk(token_attention, int(nv * PRUNING_RATIO)) -> visual span gathered in topk order
#   LLaDASdpaAttention.forward, next layer: adjust_position_ids -> 0..L'-1
#   generate_with_embeds: after the pruning forward (FASTV_PRUNING_STEP), x_embeds / x gathered
#     with VISUAL_INDICES, block bounds recomputed; later forwards run the short sequence.

def fastv_port_act(port_layer: int, port_step: int, s: int, nv: int, ratio: float):
    def factory(step):
        box = {}
        if step != port_step:
            return None, box

        def act(li, h, score):
            if li != port_layer:
                return h, False
            tok = score[:, s:s + nv].sum(dim=0)
            idx = torch.topk(tok, int(nv * ratio)).indices
            top = torch.sort(tok, descending=True).values[: idx.numel() + 1]
            box["gap"] = float(((top[:-1] - top[1:]) / top[:-1]).min().detach())
            box["keep"] = idx
            return torch.cat([h[:s], h[s:s + nv][idx], h[s + nv:]]), True

        return act, box

    return factory


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("gen", GENS, ids=lambda g: "g%d_b%d_s%d" % g)
@pytest.mark.parametrize("ratio", RATIOS)
def test_study_fastv_matches_port(golden_model, inputs, image, gen, ratio):
    # The port's FASTV_PRUNING_LAYER = 2 is the tiny model's last layer; the same code with
    # FASTV_PRUNING_LAYER = 1 is the preset with K = 2 (the preset's mapping K = layer + 1).
    port_layer, port_step = 1, 0
    method, position_ids, p = preset("study_fastv", ratio, layer=port_layer + 1)
    assert (p["score"], p["order"], p["query_set"], p["rounding"], position_ids) == \
        ("softmax_of_head_mean_logits", "score", "all", "floor", "renumber")
    ids, img = inputs[image]
    out, trace, kept, seq = run_ours(golden_model, ids, img, *gen, method, position_ids, port_step)
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    s, nv = int(vis[0]), int(vis.numel())
    ref_out, ref_trace, ref_kept = naive_generate(golden_model, seq.prompt_embeds, s, nv, *gen,
                                                  fastv_port_act(port_layer, port_step, s, nv, ratio))
    assert len(ref_kept) == int(nv * ratio)
    # informational: our scores differ from the naive ones by <= ~5e-6 relative (SDPA vs eager
    # sums); kept scores closer than that would be ordered by float noise on either side.
    print(f"[study_fastv] smallest relative gap between consecutive kept scores: {GAP['last']:.2e}")
    assert kept == ref_kept  # the same visual tokens, in the same (score) order
    assert out == ref_out
    assert trace == ref_trace


@pytest.mark.parametrize("port_step", [1, 3])
def test_study_fastv_later_step_matches_port(golden_model, inputs, port_step):
    """FASTV_PRUNING_STEP > 0 (the step comes from our schedule): same parity."""
    method, position_ids, _ = preset("study_fastv", 0.25, layer=1)
    ids, img = inputs["case_500x300"]
    out, trace, kept, seq = run_ours(golden_model, ids, img, 16, 8, 8, method, position_ids, port_step)
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    s, nv = int(vis[0]), int(vis.numel())
    ref = naive_generate(golden_model, seq.prompt_embeds, s, nv, 16, 8, 8, fastv_port_act(0, port_step, s, nv, 0.25))
    assert (out, trace, kept) == ref


# ----------------------------------------------------------------------------------------------
# DivPrune: LLaDA-V/eval/llava_divprune/model/llava_arch.py
#   prepare_inputs_labels_for_multimodal (anyres branch, START_COMPRESSION_MODE): on the image's
#     features after the newline column and the base view, k_keep = round(keep_ratio * N),
#     pivot = torch.randint(0, N, ()) (global generator), keep = min_max_greedy_search, gathered
#     (sorted) before the LLM; the LLM sees the shorter sequence with positions 0..L'-1.
#   min_max_greedy_search: x = normalize(f); max_sim = x @ x[pivot], max_sim[pivot] = inf; repeat
#     cand = argmin(max_sim); max_sim = max(max_sim, x @ x[cand]); max_sim[cand] = inf; then
#     torch.unique(kept, sorted=True).

def divprune_port_keep(feats: torch.Tensor, ratio: float) -> torch.Tensor:
    n = feats.shape[0]
    k = round(ratio * n)
    pivot = torch.randint(0, n, ())
    x = torch.nn.functional.normalize(feats, p=2, dim=-1)
    kept = [int(pivot)]
    max_sim = x @ x[pivot]
    max_sim[pivot] = float("inf")
    for _ in range(k - 1):
        cand = torch.argmin(max_sim)
        kept.append(cand.item())
        max_sim = torch.maximum(max_sim, x @ x[cand])
        max_sim[cand] = float("inf")
    return torch.unique(torch.tensor(kept, dtype=torch.long), sorted=True)


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("gen", GENS, ids=lambda g: "g%d_b%d_s%d" % g)
@pytest.mark.parametrize("ratio", RATIOS)
def test_study_divprune_matches_port(golden_model, inputs, image, gen, ratio):
    seed = 1234 + int(ratio * 100) + gen[0]  # the sample's seed (Generator.generate seeds both generators)
    method, position_ids, p = preset("study_divprune", ratio)
    assert (p["pivot"], p["greedy"], p["layer"], p["rounding"], position_ids) == \
        ("random", "min_max_similarity", 0, "round", "renumber")
    ids, img = inputs[image]
    method.reseed(seed)
    out, trace, kept, seq = run_ours(golden_model, ids, img, *gen, method, position_ids, 0)
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    s, nv = int(vis[0]), int(vis.numel())
    torch.manual_seed(seed)
    with torch.no_grad():
        keep = divprune_port_keep(seq.prompt_embeds[s:s + nv].float(), ratio)
    short = torch.cat([seq.prompt_embeds[:s], seq.prompt_embeds[s:s + nv][keep], seq.prompt_embeds[s + nv:]])
    ref_out, ref_trace, _ = naive_generate(golden_model, short, s, keep.numel(), *gen, lambda step: (None, {}))
    assert kept == keep.tolist()
    assert out == ref_out
    assert trace == ref_trace


# ----------------------------------------------------------------------------------------------
# VTW: LLaDA-V/eval/llava_vtw/model/language_model/modeling_llada.py
#   LLaDADecoderLayer.forward at VTW_PRUNING_LAYER (after the attention residual): the whole visual
#     span [s, s+nv) is dropped; LLaDAAttention.adjust_position_ids_after_pruning renumbers the next
#     layers; generate_with_embeds drops the span from x_embeds / x after the pruning forward
#     (VTW_PRUNING_STEP), so every later forward runs without the image.

def vtw_port_act(port_layer: int, port_step: int, s: int, nv: int):
    def factory(step):
        box = {}
        if step != port_step:
            return None, box

        def act(li, h, score):
            if li != port_layer:
                return h, False
            box["keep"] = torch.empty(0, dtype=torch.long)
            return torch.cat([h[:s], h[s + nv:]]), True

        return act, box

    return factory


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("gen", GENS, ids=lambda g: "g%d_b%d_s%d" % g)
@pytest.mark.parametrize("port_step", [0, 2])
def test_study_vtw_matches_port(golden_model, inputs, image, gen, port_step):
    # VTW_PRUNING_LAYER = 15 -> K = 16 in the preset; on the 3-layer tiny model the port's layer 0
    # and 1 are K = 1 and 2 (the mapping K = layer + 1 checked on the preset itself).
    method, position_ids, p = preset("study_vtw", 0.25)
    assert (p["layer"], position_ids) == (16, "renumber")
    port_layer = 1 if port_step == 0 else 0
    method, position_ids, _ = preset("study_vtw", 0.25, layer=port_layer + 1)
    ids, img = inputs[image]
    out, trace, kept, seq = run_ours(golden_model, ids, img, *gen, method, position_ids, port_step)
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    s, nv = int(vis[0]), int(vis.numel())
    ref_out, ref_trace, ref_kept = naive_generate(golden_model, seq.prompt_embeds, s, nv, *gen,
                                                  vtw_port_act(port_layer, port_step, s, nv))
    assert kept == ref_kept == []
    assert out == ref_out
    assert trace == ref_trace


# ----------------------------------------------------------------------------------------------
# SparseVLM: LLaDA-V/eval/llava_sparsevlm/model/language_model/
#   modeling_llada.py LLaDAModel.forward: raters from the forward's input embeddings, v_t = the
#     visual span, t_t = every token after it; m_v_t = softmax(v_t t_t^T, over t).mean(over v);
#     t_token_idx = where(m_v_t > m_v_t.mean()).
#   At SPARSEVLM_PRUNING_LAYER l (step SPARSEVLM_PRUNING_STEP): LLaDADecoderLayer.forward runs the
#     whole layer (attention + MLP) and returns scaled_dot_product_attention's attn_score
#     (softmax over keys of the head-mean logits, no bias); score.py attn_postprocess_topk:
#     relation = attn_score[t_token_idx, visual].mean(over raters), topk(int(N * keep)) as a mask
#     (kept tokens in position order). Recycling: the pruned tokens' layer-l outputs (position
#     order), the top int(0.3 p) + 1 by relation (topk order), utils.py cluster_and_merge with
#     int(m / 10) + 1 clusters; the sequence becomes prefix + kept visual + merged tokens + the
#     rest, position_ids truncated to 0..L'-1 for the following layers.
#   cluster_and_merge: dist = ||x_i - x_j|| / sqrt(C); density = exp(-mean of the k smallest
#     dist^2) + rand * 1e-6 (global generator); delta = min dist to a strictly denser token (the
#     largest distance for the densest); centres = topk(delta * density, k); each token joins its
#     nearest centre (centres themselves); merged = sum of members / (count + 1e-6).
#   generate_with_embeds after the pruning forward: x_embeds / x keep the prompt, the kept visual
#     tokens (VISUAL_INDICES > 0) and the rest; the logits rows of the merged tokens are cut out.

def sparsevlm_port_cluster_and_merge(x: torch.Tensor, c: int) -> torch.Tensor:
    m, C = x.shape
    dist = (x[:, None] - x[None]).norm(dim=-1, p=2) / (C ** 0.5)
    near = torch.topk(dist, k=c, dim=-1, largest=False).values
    density = (-(near ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, dtype=density.dtype) * 1e-6
    mask = (density[None, :] > density[:, None]).float()
    dmax = dist.max()
    delta = (dist * mask + dmax * (1 - mask)).min(dim=-1).values
    centres = torch.topk(delta * density, k=c).indices
    cluster = dist[centres].argmin(dim=0)
    cluster[centres] = torch.arange(c)
    weight = torch.zeros(c).index_add_(0, cluster, torch.ones(m)) + 1e-6
    return torch.zeros(c, C).index_add_(0, cluster, x / weight[cluster][:, None])


def sparsevlm_port_act(port_layer: int, port_step: int, s: int, nv: int, ratio: float):
    def factory(step):
        box = {}
        if step != port_step:
            return None, box

        def begin(x):
            v, t = x[s:s + nv], x[s + nv:]
            rel = torch.softmax(v @ t.T, dim=-1).mean(0)
            box["raters"] = torch.nonzero(rel > rel.mean()).squeeze(1) + s + nv

        def act(li, h, score):
            if li != port_layer:
                return h, False
            relation = score[box["raters"]][:, s:s + nv].mean(0)
            mask = torch.zeros(nv, dtype=torch.bool)
            mask[torch.topk(relation, int(nv * ratio)).indices] = True
            kept, pruned = torch.nonzero(mask).squeeze(1), torch.nonzero(~mask).squeeze(1)
            m = int(pruned.numel() * 0.3) + 1
            stage2 = torch.topk(relation[pruned], m).indices
            merged = sparsevlm_port_cluster_and_merge(h[s:s + nv][pruned][stage2], int(m / 10) + 1)
            box["keep"] = kept
            return torch.cat([h[:s], h[s:s + nv][kept], merged, h[s + nv:]]), True

        act.after_mlp, act.begin = True, begin
        return act, box

    return factory


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("gen", GENS, ids=lambda g: "g%d_b%d_s%d" % g)
@pytest.mark.parametrize("ratio", RATIOS)
def test_study_sparsevlm_matches_port(golden_model, inputs, image, gen, ratio):
    # SPARSEVLM_PRUNING_LAYER = 6 -> layers [7] in the preset (K = l + 1); on the 3-layer tiny model
    # the port's layer 1 is layers [2].
    port_layer, port_step = 1, 0
    seed = 4321 + int(ratio * 100) + gen[0]
    method, position_ids, p = preset("study_sparsevlm", 0.25)
    assert (p["layers"], p["version"], p["ratio_target"], p["rounding"], p["score"], p["recycled_at"],
            p["recycled_persist"], p["density_ties"], position_ids) == \
        ([7], "v1", "last", "floor", "softmax_of_head_mean_logits", "after_kept", "none", "noise", "renumber")
    method, position_ids, _ = preset("study_sparsevlm", ratio, layers=[port_layer + 1])
    ids, img = inputs[image]
    method.reseed(seed)
    out, trace, kept, seq = run_ours(golden_model, ids, img, *gen, method, position_ids, port_step)
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    s, nv = int(vis[0]), int(vis.numel())
    torch.manual_seed(seed)
    ref_out, ref_trace, ref_kept = naive_generate(golden_model, seq.prompt_embeds, s, nv, *gen,
                                                  sparsevlm_port_act(port_layer, port_step, s, nv, ratio))
    assert len(ref_kept) == int(nv * ratio)
    assert kept == ref_kept
    assert out == ref_out
    assert trace == ref_trace


@pytest.mark.parametrize("port_step", [1, 3])
def test_study_sparsevlm_later_step_matches_port(golden_model, inputs, port_step):
    """SPARSEVLM_PRUNING_STEP > 0 (47 in the port; the step comes from our schedule): the raters
    then include committed response tokens; same parity."""
    method, position_ids, _ = preset("study_sparsevlm", 0.25, layers=[1])
    ids, img = inputs["case_500x300"]
    method.reseed(7)
    out, trace, kept, seq = run_ours(golden_model, ids, img, 16, 8, 8, method, position_ids, port_step)
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    s, nv = int(vis[0]), int(vis.numel())
    torch.manual_seed(7)
    ref = naive_generate(golden_model, seq.prompt_embeds, s, nv, 16, 8, 8, sparsevlm_port_act(0, port_step, s, nv, 0.25))
    assert (out, trace, kept) == ref
