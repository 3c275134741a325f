"""SparseVLM against naive references on the tiny model (4 layers, so pruning layers [1, 2, 3]).

The references are written from the spec (methods.md §4.1, Gumpest/SparseVLMs), not from the
implementation: raters with explicit loops over the text tokens, the full per-head softmax
attention matrix of every scoring layer, DPC-kNN with explicit loops over token pairs, merged
hidden states as plain means, and the decoder layers run by hand with the v1 (renumber) or
v2 (keep) position policy. Then budgets per layer and step (kept_by_step_layer), the ratio=1.0
no-op, and the config surface.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.engine.recorder import Recorder
from dvlm_exp.decoding.generator import GenPreset, Generator
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.pruning.sparsevlm import SparseVLM, dpc_knn, scale_to_average
from dvlm_exp.decoding.sampler import MaskedDiffusionSampler
from dvlm_exp.schedules.at_step import AtStep
from dvlm_exp.schedules.first_step import FirstStep

LAYERS = [1, 2, 3]
PRESET = GenPreset(gen_length=8, block_length=8, steps=4, think=None, stop=[])


@pytest.fixture(scope="module")
def seq_factory(tiny_model, doc_images):
    """A real prompt (tiny model, synthetic page); `stride` > 1 keeps every stride-th visual
    token (renumbered as a fresh unpruned sequence) so the hand-run references stay fast."""
    cache = {}

    def make(gen_length=8, image=0, commit=(), stride=4):
        if (gen_length, image) not in cache:
            ids = tiny_model.prompt_ids("What is the total?", n_images=1, think="no_think")
            cache[gen_length, image] = tiny_model.prepare(ids, [doc_images[image]], gen_length)[0]
        seq = cache[gen_length, image]
        vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
        keep = torch.nonzero((seq.roles != Roles.VISUAL)).squeeze(1)
        keep = torch.sort(torch.cat([keep, vis[::stride]])).values
        seq = replace(seq, prompt_embeds=seq.prompt_embeds[keep].clone(), roles=seq.roles[keep].clone(),
                      positions=torch.arange(keep.numel()), response_ids=seq.response_ids.clone(),
                      prompt_len0=keep.numel(), n_visual0=-1)
        for j, tok in commit:  # some answer slots already decoded
            seq.response_ids[j] = tok
        return seq

    return make


def decode(model, method, schedule, seq, position_ids="keep"):
    """The generator's sampling loop on a prepared sequence; returns (output ids, SampleRecord)."""
    rec = Recorder()
    eng = Engine(model, method, schedule, rec, position_ids=position_ids)
    sampler = MaskedDiffusionSampler(PRESET.sampler_config(), model.banned_ids)
    rec.start_sample()
    out_ids, _ = sampler.generate(eng, replace(seq, response_ids=seq.response_ids.clone()))  # it writes the answer in place
    return out_ids, rec.current


# --------------------------------------------------------------------------- naive references
def naive_raters(emb: torch.Tensor, roles: torch.Tensor, query_set: str) -> tuple[list[int], list[float]]:
    """Text tokens after the image whose mean (over visual tokens) softmax relevance beats the mean."""
    n = roles.numel()
    vis = [i for i in range(n) if roles[i] == Roles.VISUAL]
    text = [i for i in range(n) if i > vis[-1] and roles[i] != Roles.VISUAL]
    e = emb.double()
    V = e[vis]
    cols = [V @ e[t] for t in text]  # V·t for every text token t (a column per text token)
    mx = cols[0].clone()
    for col in cols[1:]:
        mx = torch.maximum(mx, col)
    z = sum(torch.exp(col - mx) for col in cols)  # per visual row: the softmax denominator over T
    r = [float((torch.exp(col - mx) / z).mean()) for col in cols]  # mean over visual rows
    mean = sum(r) / len(r)
    raters = [t for t, s in zip(text, r) if s > mean] if query_set == "raters" else list(text)
    return raters, r


def naive_head_probs(layer, h: torch.Tensor, cos, sin) -> torch.Tensor:
    """Per-head softmax attention [h, n, n] of `layer` on hidden states h [1, n, d], by hand."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    n, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.softmax((q @ k.transpose(-1, -2)) / hd ** 0.5, dim=-1)[0]


def naive_dpc_knn(x: torch.Tensor, c: int) -> tuple[list[int], list[int]]:
    """DPC-kNN as in SparseVLM's cluster_and_merge, loops over pairs (ties: earlier token first)."""
    m, C = x.shape
    x = x.double()
    d = [[0.0] * m for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            d[i][j] = d[j][i] = float(torch.sqrt(((x[i] - x[j]) ** 2).sum())) / math.sqrt(C)
    dmax = max(max(row) for row in d)
    rho = []
    for i in range(m):
        nearest = sorted(d[i])[:c]  # includes the token itself (distance 0)
        rho.append(math.exp(-sum(v * v for v in nearest) / c))
    delta = []
    for i in range(m):
        higher = [j for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(d[i][j] for j in higher) if higher else dmax)
    score = [delta[i] * rho[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:c]
    assign = []
    for i in range(m):
        if i in centres:
            assign.append(centres.index(i))
        else:
            best = min(range(c), key=lambda a: (d[i][centres[a]], a))
            assign.append(best)
    return centres, assign


def naive_budgets(n_vis0, ratio, n_layers, shape, layers) -> list[int]:
    """Solve (L1 + Σ span_i f_i)/T = ratio with f_i = s·shape_i when nothing caps (checked)."""
    spans = [b - a for a, b in zip(layers, layers[1:] + [n_layers])]
    s = (ratio * n_layers - layers[0]) / sum(sp * b for sp, b in zip(spans, shape))
    f = [s * b for b in shape]
    assert all(0 < v < 1 for v in f)
    return [max(1, round(n_vis0 * v)) for v in f]


@torch.no_grad()
def naive_forward(model, seq, counts: dict, version: str, query_set: str, n_heads_sel: int):
    """SparseVLM by hand on one forward. Returns per-layer decisions (keep indices into the
    current visual tokens; (src, centre) pairs), logits of the response rows, kept prompt
    indices and the (merged) input embeddings of the kept prompt."""
    h = torch.cat([seq.prompt_embeds, model.embed_tokens(seq.response_ids)])[None].clone()
    emb = h[0].clone()
    roles = seq.all_roles().clone()
    orig = list(range(h.shape[1]))  # original index of every current token
    raters, _ = naive_raters(emb, roles, query_set)
    probs = None
    decisions = {}
    for li, layer in enumerate(model.layers):
        if li in counts and probs is not None:
            vis = [i for i in range(len(orig)) if roles[i] == Roles.VISUAL]
            rows = [orig.index(t) for t in raters]
            heads = list(range(probs.shape[0]))
            if version == "v2":
                mass = [sum(float(probs[hh, r, vis].sum()) for r in rows) for hh in heads]
                heads = sorted(heads, key=lambda hh: (-mass[hh], hh))[:n_heads_sel]
            acc = torch.zeros(len(vis), dtype=torch.float64)
            for hh in heads:  # mean over the (selected) heads and the raters of their rows
                for r in rows:
                    acc += probs[hh, r, vis].double()
            rel = (acc / (len(heads) * len(rows))).tolist()
            k = min(counts[li], len(vis))
            keep = sorted(sorted(range(len(vis)), key=lambda j: -rel[j])[:k])
            pairs = []
            if version == "v1":
                pruned = [j for j in range(len(vis)) if j not in keep]
                m = int(len(pruned) * 0.3) + 1
                rec = sorted(pruned, key=lambda j: (-rel[j], j))[:m]
                c = m // 10 + 1
                centres, assign = naive_dpc_knn(h[0, [vis[j] for j in rec]], c)
                for a, ctr in enumerate(centres):
                    members = [rec[i] for i in range(m) if assign[i] == a]
                    row = vis[rec[ctr]]
                    h[0, row] = torch.stack([h[0, vis[j]] for j in members]).mean(0)
                    emb[row] = torch.stack([emb[vis[j]] for j in members]).mean(0)
                    pairs += [(j, rec[ctr]) for j in members if j != rec[ctr]]
                keep = sorted(keep + [rec[ctr] for ctr in centres])
            decisions[li] = (keep, sorted(pairs))
            keep_vis = {vis[j] for j in keep}
            sel = [i for i in range(len(orig)) if roles[i] != Roles.VISUAL or i in keep_vis]
            h, emb, roles = h[:, sel], emb[sel], roles[sel]
            orig = [orig[i] for i in sel]
        pos = torch.tensor(orig) if version == "v2" else torch.arange(len(orig))  # v2 keeps ids, v1 renumbers
        cos, sin = model.rotary_emb(h, pos[None])
        probs = naive_head_probs(layer, h, cos, sin) if li + 1 in counts else None
        h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
    logits = model.lm_head(model.norm(h[:, -seq.gen_length:]))[0].float()
    n_prompt = seq.prompt_embeds.shape[0]
    kept_prompt = [o for o in orig if o < n_prompt]
    return decisions, logits, kept_prompt, emb[: len(kept_prompt)]


class Recording(SparseVLM):
    """The method under test, recording every Decision it returns."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log = {}

    def decide(self, view):
        d = super().decide(view)
        if d is not None:
            self.log[view.layer] = d
        return d


# --------------------------------------------------------------------------- tests
def test_raters_match_naive_loops(tiny_model, seq_factory):
    seq = seq_factory(commit=[(1, 300)])
    emb = torch.cat([seq.prompt_embeds, tiny_model.embed_tokens(seq.response_ids)])
    roles = seq.all_roles()
    for query_set in ("raters", "text"):
        raters, r = naive_raters(emb, roles, query_set)
        t_idx, scores = SparseVLM.rater_scores(emb, roles)
        torch.testing.assert_close(scores.double(), torch.tensor(r, dtype=torch.float64), rtol=1e-5, atol=1e-9)
        # the response slots are part of T (the study's port) and the raters are a strict subset
        assert seq.prompt_embeds.shape[0] + seq.gen_length - 1 in t_idx.tolist()
        if query_set == "text":
            assert raters == t_idx.tolist()
            continue
        m = SparseVLM(ratio=0.5, layers=LAYERS, query_set=query_set)
        eng = Engine(tiny_model, m, FirstStep())
        eng.recorder.start_sample()
        eng.forward(seq, 0, torch.arange(seq.gen_length))
        assert m._rater_pos.tolist() == raters
        assert 0 < len(raters) < t_idx.numel()


def test_dpc_knn_matches_naive_loops():
    g = torch.Generator().manual_seed(0)
    # three blobs plus noise, and exact duplicates (density ties broken by token order)
    centres = torch.randn(3, 16, generator=g) * 4
    x = torch.cat([centres[i % 3] + 0.5 * torch.randn(16, generator=g) for i in range(40)]).view(40, 16)
    x = torch.cat([x, x[:3]])
    for c in (1, 3, 5):
        got_c, got_a = dpc_knn(x, c)
        exp_c, exp_a = naive_dpc_knn(x, c)
        assert got_c.tolist() == exp_c and got_a.tolist() == exp_a
    # well separated blobs: three centres recover the blobs
    _, a = dpc_knn(x, 3)
    per_blob = [{int(a[j]) for j in range(43) if (j if j < 40 else j - 40) % 3 == b} for b in range(3)]
    assert all(len(s) == 1 for s in per_blob) and len(set.union(*per_blob)) == 3


@pytest.mark.parametrize("version,query_set,image", [("v1", "raters", 0), ("v2", "raters", 1), ("v1", "text", 1)])
def test_forward_matches_naive(tiny_model, seq_factory, version, query_set, image):
    """Per-layer selections, v1 clusters and merges, positions and logits equal the hand-run forward."""
    seq = seq_factory(image=image, commit=[(0, 300), (5, 301)])
    m = Recording(ratio=0.55, layers=LAYERS, version=version, query_set=query_set)
    counts = m.budget_counts(seq.n_visual0, 0.55, tiny_model.num_layers)
    eng = Engine(tiny_model, m, FirstStep(), position_ids=m.default_position_ids)
    eng.recorder.start_sample()
    out = eng.forward(seq, 0, torch.arange(seq.gen_length))
    n_sel = m.n_heads_kept(tiny_model.layers[0].self_attn.config.num_attention_heads)
    assert n_sel == 2  # round(4 heads * 14 / 32)
    decisions, logits, kept_prompt, emb = naive_forward(tiny_model, seq, counts, version, query_set, n_sel)
    assert sorted(m.log) == sorted(decisions) == LAYERS
    for li, (keep, pairs) in decisions.items():
        d = m.log[li]
        assert d.keep.tolist() == keep, li
        if version == "v1":
            got = sorted((int(s), int(d.keep[t])) for s, t in zip(d.merge_src, d.merge_dst))
            assert got == pairs and len(pairs) > 0
        else:
            assert not d.merges
    assert out.keep.tolist() == kept_prompt
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)
    if version == "v1":  # merged input embeddings persist (cluster means)
        torch.testing.assert_close(out.embeds, emb, rtol=1e-5, atol=1e-6)
    else:
        assert out.embeds is None


@pytest.mark.parametrize("version,act,full", [("v1", 0, True), ("v2", 2, False)])
def test_budgets_reached_per_step_and_layer(tiny_model, doc_images, seq_factory, version, act, full):
    """kept_by_step_layer: N before layer 1; the budget (v1: + ⌊(int(0.3p)+1)/10⌋+1 merged tokens)
    from each pruning layer on; later steps run the final set in every layer (state persistence).
    v1 through the Generator (the whole pipeline), v2 on a thinned prompt, acting at step 2."""
    T, ratio = tiny_model.num_layers, 0.5
    schedule = FirstStep() if act == 0 else AtStep(step=act)
    m = SparseVLM(ratio=ratio, layers=LAYERS, version=version)
    if full:
        gen = Generator(tiny_model, m, schedule, PRESET, position_ids=m.default_position_ids)
        gen.generate("What is the date?", [doc_images[0]])
        rec = gen.recorder.current
    else:
        seq = seq_factory(image=1)
        _, rec = decode(tiny_model, m, schedule, seq, m.default_position_ids)
        rec.n_visual = seq.n_visual0
    n0 = rec.n_visual
    shape = {"v1": [300, 200, 110], "v2": [300, 200, 118]}[version]  # RETAIN_TOKN 192 (nearest 0.5)
    budgets = naive_budgets(n0, ratio, T, [b / 576 for b in shape], LAYERS)
    expect_layer = {0: n0}
    n = n0
    for L, b in zip(LAYERS, budgets):
        if version == "v1":
            n = b + (int((n - b) * 0.3) + 1) // 10 + 1
        else:
            n = b
        expect_layer[L] = n
    for step in range(PRESET.steps):
        for layer in range(T):
            if step < act:
                exp = n0
            elif step == act:
                exp = expect_layer[layer]
            else:
                exp = expect_layer[T - 1]
            assert rec.kept_by_step_layer[(step, layer)] == exp, (version, step, layer)
    # the budgets' layer average is the keep ratio (up to rounding)
    assert abs((1 + sum(b / n0 for b in budgets)) / T - ratio) < 2 / n0


def test_budget_shapes_and_targets(tiny_model):
    # LLaVA-1.5's 32 layers at RETAIN_TOKN=192: the published shape, scaled to average 1/3
    f = scale_to_average([300 / 576, 200 / 576, 110 / 576], [2, 6, 15], 32, 192 / 576)
    assert abs((2 + 4 * f[0] + 9 * f[1] + 17 * f[2]) / 32 - 192 / 576) < 1e-12
    assert abs(f[0] / f[2] - 300 / 110) < 1e-12
    # caps: a high ratio saturates the first layers, which then prune nothing
    m = SparseVLM(ratio=0.9, layers=LAYERS)
    c = m.budget_counts(1000, 0.9, 4)
    # (1 + f1 + f2 + f3) / 4 = 0.9: f1, f2 capped at 1 -> f3 = 0.6
    assert c == {1: 1000, 2: 1000, 3: 600}
    # last: the last pruning layer keeps `ratio`; a single layer is FastV-like (study port)
    assert SparseVLM(ratio=0.25, layers=[2], ratio_target="last").budget_counts(1000, 0.25, 4) == {2: 250}
    c = SparseVLM(ratio=0.2, layers=LAYERS, ratio_target="last").budget_counts(576, 0.2, 4)
    # 0.2 is nearest RETAIN_TOKN 128 (0.222): v1 shape [303, 110, 36], scaled so 36 -> 0.2 * 576
    assert c[3] == round(0.2 * 576) and c[1] == 576 and c[2] == round(0.2 * 576 * 110 / 36)
    # none: explicit fractions, ratio ignored
    c = SparseVLM(ratio=0.9, layers=LAYERS, budgets=[0.5, 0.25, 0.125], ratio_target="none").budget_counts(800, 0.9, 4)
    assert c == {1: 400, 2: 200, 3: 100}
    # explicit shape, scaled to the average
    c = SparseVLM(ratio=0.5, layers=LAYERS, budgets=[3, 2, 1]).budget_counts(600, 0.5, 4)
    assert c == {1: 300, 2: 200, 3: 100}
    with pytest.raises(ValueError):
        SparseVLM(layers=[0, 2])
    with pytest.raises(ValueError):
        SparseVLM(layers=[1, 2], budgets=[0.5])
    with pytest.raises(ValueError):
        SparseVLM(version="v3")
    with pytest.raises(ValueError):
        m = SparseVLM(layers=[2, 6, 15])
        m.budget_fractions(0.5, 4)


def test_ratio_one_reproduces_unpruned(tiny_model, seq_factory):
    seq = seq_factory(image=1)
    base_ids, _ = decode(tiny_model, NoPruning(), FirstStep(), seq)
    eng = Engine(tiny_model, None, None)
    eng.recorder.start_sample()
    base_logits = eng.forward(seq, 0, None).logits
    for version in ("v1", "v2"):
        m = SparseVLM(ratio=1.0, layers=LAYERS, version=version)
        ids, rec = decode(tiny_model, m, FirstStep(), seq, m.default_position_ids)
        assert ids == base_ids and len(ids) == PRESET.gen_length
        assert set(rec.kept_by_step_layer.values()) == {seq.n_visual0}
        assert rec.scoring_flops == 0  # no attention rows requested when nothing would be pruned
        eng = Engine(tiny_model, m, FirstStep(), position_ids=m.default_position_ids)
        eng.recorder.start_sample()
        out = eng.forward(seq, 0, None)
        assert out.keep is None and torch.equal(out.logits, base_logits)


def test_position_policy_v1_renumber_v2_keep(tiny_model, seq_factory):
    """v1's positions are arange (the code truncates position_ids), v2's the survivors' own: the
    same v2 decisions under renumbered positions give different logits."""
    assert SparseVLM(version="v1").default_position_ids == "renumber"
    assert SparseVLM(version="v2").default_position_ids == "keep"
    seq = seq_factory()
    outs = {}
    for pol in ("keep", "renumber"):
        eng = Engine(tiny_model, SparseVLM(ratio=0.4, layers=[2], version="v2", ratio_target="last"), FirstStep(),
                     position_ids=pol)
        eng.recorder.start_sample()
        outs[pol] = eng.forward(seq, 0, torch.arange(seq.gen_length))
    assert outs["keep"].keep.tolist() == outs["renumber"].keep.tolist()  # layer 1 is unaffected
    assert not torch.allclose(outs["keep"].logits, outs["renumber"].logits)


def test_config_builds_method():
    from dvlm_exp.run.build import build_pruner, compose_config
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import _check_prune

    cfg = compose_config(["prune=sparsevlm", "ratio=0.25", "prune.layers=[1,2,3]"])
    m = build_pruner(cfg)
    assert isinstance(m, SparseVLM) and m.layers == [1, 2, 3] and m.version == "v1" and m.ratio == 0.25
    assert cfg.prune.position_ids == m.default_position_ids
    _check_prune(cfg)
    with pytest.raises(ConfigError):  # the default layers [2, 6, 15] do not fit the 4-layer tiny model
        _check_prune(compose_config(["prune=sparsevlm"]))


def test_dpc_knn_noise_matches_port_cluster_and_merge():
    """`density_ties: noise` against the dMLLM study's port (LLaDA-V/eval/llava_sparsevlm/model/
    language_model/utils.py cluster_and_merge, re-stated in tests/test_study_ports.py) on rows
    with exact density ties (duplicated rows): the same 1e-6 noise draw (the method's generator
    and the global one seeded alike) gives the same centres, in the same order, and members."""
    from test_study_ports import sparsevlm_port_cluster_and_merge

    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 16, generator=g)
    x = torch.cat([base, base[:8], base[:4]])[torch.randperm(24, generator=g)]  # exact ties
    c = 4
    torch.manual_seed(11)
    ref = sparsevlm_port_cluster_and_merge(x, c)
    from dvlm_exp.pruning.sparsevlm import DENSITY_NOISE, dpc_knn_noise

    noise = torch.rand(24, generator=torch.Generator().manual_seed(11)) * DENSITY_NOISE
    centres, assign = dpc_knn_noise(x, c, noise)
    ours = torch.zeros(c, 16).index_add_(0, assign, x) / torch.bincount(assign, minlength=c)[:, None]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # the port divides by count + 1e-6


def test_port_options_validated():
    with pytest.raises(ValueError, match="v1 port"):
        SparseVLM(version="v2", score="softmax_of_head_mean_logits")
    for field in ("score", "recycled_at", "recycled_persist", "density_ties"):
        with pytest.raises(ValueError, match=f"prune.{field} must be one of"):
            SparseVLM(**{field: "bogus"})


def test_prefix_cache_refuses_transient_recycling():
    """The prefix cache keeps what each layer kept: the port's recycled tokens (only the pruning
    forward sees them) are refused before loading; the default recycling is accepted."""
    from dvlm_exp.engine.prefix import check_config
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.build import compose_config

    base = ["model=lavida_llada", "model.prefix_cache=true", "schedule=first_step", "ratio=0.25"]
    with pytest.raises(ConfigError, match="recycled_persist=none"):
        check_config(compose_config(["prune=study_sparsevlm", *base]))
    check_config(compose_config(["prune=study_sparsevlm", "prune.recycled_persist=mean_embeds", *base]))
