"""VisiPruner against naive references on the tiny model.

The reference runs the decoder by hand: every layer's attention as a full per-head softmax
matrix, the shallow stage as explicit zeroing of text->vision probabilities (no renormalisation),
the middle / deep signals as explicit per-token contributions c_i = concat_h a_{q,i} v_i and
cosines cos(o - c_i, o), and the gathers as index lists. The engine computes the same things
from score rows and an attention edit on top of SDPA, so any mismatch in rows, columns,
aggregation, layer bookkeeping or the kept set shows up.

Thresholds: the method's defaults (tokens_threshold 0.2 etc.) are on LLaVA-1.5-7B's scale; on
the random tiny model the tests pick thresholds that make each stage fire (layer_threshold > 1:
any layer is a fusion layer; tokens_threshold at a gap in the middle of the reference's norms,
so about half the tokens survive; deep_exit_cos below -1: no token ever matters).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.engine.engine import View
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.pruning.visipruner import QUERY_SETS, VisiPruner
from dvlm_exp.schedules.first_step import FirstStep

VIS = Roles.VISUAL


@pytest.fixture(scope="module")
def seq_factory(tiny_model, doc_images):
    cache = {}

    def make(gen_length=8, image=0, commit=(), think="no_think", question="What is the total?"):
        key = (gen_length, image, tuple(commit), think, question)
        if key not in cache:  # the vision tower is the slow part; tests never mutate a Sequence
            ids = tiny_model.prompt_ids(question, n_images=1, think=think)
            seq, _ = tiny_model.prepare(ids, [doc_images[image]], gen_length)
            for j, tok in commit:  # some answer slots already decoded
                seq.response_ids[j] = tok
            cache[key] = seq
        return cache[key]

    return make


# ----------------------------------------------------------------------------- naive reference
def naive_layer(layer, h, cos, sin, zero_rows=(), zero_cols=(), sink_rows=(), sink_col=None):
    """One decoder layer by hand. Rows in `zero_rows` get probability 0 on the key columns
    `zero_cols` after the softmax (no renormalisation); rows also in `sink_rows` get the removed
    mass put on key column `sink_col`. Returns (hidden, probs [H, n, n], values [H, n, dh])."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    n, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    probs = torch.softmax((q @ k.transpose(-1, -2)) / hd ** 0.5, dim=-1)[0]  # [H, n, n]
    rows = torch.tensor(list(zero_rows), dtype=torch.long)
    cols = torch.tensor(list(zero_cols), dtype=torch.long)
    if rows.numel():
        mass = probs[:, rows][:, :, cols].sum(-1)  # [H, rows]: the probability removed per row
        probs[:, rows[:, None], cols[None, :]] = 0.0
        sink_set = set(sink_rows)
        sink = torch.tensor([r in sink_set for r in zero_rows])
        if sink.any():
            probs[:, rows[sink], sink_col] = mass[:, sink]
    out = (probs @ v[0]).transpose(0, 1).reshape(1, n, -1)  # concat over heads
    h = h + attn.o_proj(out)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, probs, v[0]


def naive_queries(query_set, roles, is_mask):
    n = len(roles)
    resp = [p for p in range(n) if roles[p] == Roles.RESPONSE]
    if query_set == "last_token":
        return [n - 1]
    if query_set == "last_prompt_token":
        return [max(p for p in range(n) if roles[p] != Roles.RESPONSE)]
    masked = [p for j, p in enumerate(resp) if is_mask[j]]
    return masked or resp


def naive_contributions(probs, v, Q, vis):
    """cos(o - c_i, o) and ||c_i|| per visual token, with the query rows averaged per head."""
    H = probs.shape[0]
    a = torch.stack([sum(probs[hh, q] for q in Q) / len(Q) for hh in range(H)])  # [H, n]
    o = torch.cat([a[hh] @ v[hh] for hh in range(H)])  # sum over all keys, concat over heads
    vis = torch.tensor(vis)
    c = torch.cat([a[hh, vis, None] * v[hh, vis] for hh in range(H)], dim=1)  # [nv, H*dh], row i = c_i
    r = o[None] - c
    cosines = (r @ o) / (r.norm(dim=1) * o.norm())
    return cosines.tolist(), c.norm(dim=1).tolist()


def naive_visipruner(model, seq, *, mid, lt, tt, dc, dp, query_set="masked_response",
                     stages=("shallow", "middle", "deep"), layer0="cross", rows_mode="after_image"):
    """One forward of VisiPruner written plainly (original positions kept). `tt` may be a function
    of the fusion layer's norms (the test picks the threshold from them). Returns a dict."""
    T = len(model.layers)
    with torch.no_grad():
        h = torch.cat([seq.prompt_embeds, model.embed_tokens(seq.response_ids)])[None]
        n0 = h.shape[1]
        cos0, sin0 = model.rotary_emb(h, torch.arange(n0)[None])
        idx = list(range(n0))  # original index of each current token
        roles = seq.all_roles().tolist()
        is_mask = seq.is_mask.tolist()
        phase = "middle" if "middle" in stages else "done"
        count, pending, fusion, exit_layer = 0, None, None, None
        kept, diag = [], {}
        for li, layer in enumerate(model.layers):
            if pending is not None:
                vis_now = [p for p in range(len(idx)) if roles[p] == VIS]
                keep_pos = sorted([p for p in range(len(idx)) if roles[p] != VIS] + [vis_now[j] for j in pending])
                h = h[:, keep_pos]
                idx = [idx[p] for p in keep_pos]
                roles = [roles[p] for p in keep_pos]
                pending = None
            vis = [p for p in range(len(idx)) if roles[p] == VIS]
            kept.append(len(vis))
            cos, sin = cos0[:, idx], sin0[:, idx]
            edit = {}
            if "shallow" in stages and li < mid and vis and not (li == 0 and layer0 == "none"):
                text = [p for p in range(len(idx)) if roles[p] != VIS and (rows_mode == "all_text" or p > vis[0])]
                if li == 0 and layer0 == "sink":
                    rows = sorted(set(text) | {p for p in range(len(idx)) if p >= vis[0]})
                    edit = dict(zero_rows=rows, zero_cols=vis, sink_rows=text, sink_col=vis[0])
                else:
                    edit = dict(zero_rows=text, zero_cols=vis)
            h, probs, v = naive_layer(layer, h, cos, sin, **edit)
            if li < T - 1 and vis and phase != "done" and (phase == "deep" or li > mid):
                Q = naive_queries(query_set, roles, is_mask)
                cosines, norms = naive_contributions(probs, v, Q, vis)
                diag[li] = (cosines, norms)
                if phase == "middle":
                    if min(cosines) < lt:
                        fusion = li
                        phase = "deep" if "deep" in stages else "done"
                        if callable(tt):
                            tt = tt(norms)
                        pending = [j for j in range(len(vis)) if norms[j] > tt]
                        if not pending:
                            phase = "done"
                else:
                    if all(c >= dc for c in cosines):
                        count += 1
                    if count >= dp:
                        pending, phase, exit_layer = [], "done", li + 1
        logits = model.lm_head(model.norm(h[:, -seq.gen_length:]))[0].float()
    n_prompt = seq.prompt_embeds.shape[0]
    return dict(logits=logits, kept=kept, fusion=fusion, exit=exit_layer, diag=diag, tt=tt,
                keep_prompt=[i for i in idx if i < n_prompt])


def gap_threshold(values):
    """A threshold in the widest relative gap among the middle 30-70 % of sorted values."""
    s = sorted(values)
    lo, hi = int(0.3 * len(s)), int(0.7 * len(s))
    j = max(range(lo, hi), key=lambda i: (s[i + 1] - s[i]) / max(abs(s[i + 1]), 1e-30))
    return 0.5 * (s[j] + s[j + 1])


def run_engine(model, seq, method, persist="state"):
    eng = Engine(model, method, FirstStep(persist=persist), position_ids="keep")
    eng.recorder.start_sample()
    eng.begin_sample(1)
    out = eng.forward(seq, 0, torch.arange(seq.gen_length))
    T = len(model.layers)
    kept = [eng.recorder.current.kept_by_step_layer[(0, li)] for li in range(T)]
    return out, kept


# ----------------------------------------------------------------------------- shallow stage
@pytest.mark.parametrize("layer0,rows_mode", [("cross", "after_image"), ("sink", "after_image"), ("none", "all_text")])
def test_shallow_edit_equals_masked_attention_layer(tiny_model, seq_factory, layer0, rows_mode):
    """The edited layer output equals a layer computed with explicitly masked probabilities."""
    seq = seq_factory(commit=[(1, 300)])
    m = tiny_model
    method = VisiPruner(shallow_mid_layer=2, layer_threshold=-2.0, deep_exit_cos=-2.0,
                        shallow_layer0=layer0, shallow_rows=rows_mode)
    with torch.no_grad():
        h = torch.cat([seq.prompt_embeds, m.embed_tokens(seq.response_ids)])[None]
        n = h.shape[1]
        cos, sin = m.rotary_emb(h, torch.arange(n)[None])
        roles = seq.all_roles()
        rl = roles.tolist()
        vis = [p for p in range(n) if rl[p] == VIS]
        text = [p for p in range(n) if rl[p] != VIS and (rows_mode == "all_text" or p > vis[0])]
        for li in (0, 1):
            view = View(step=0, layer=li, n_layers=len(m.layers), seq=seq, roles=roles, positions=torch.arange(n),
                        hidden=h, embeds0=h[0], ratio=1.0, acting=True)
            edit = method.attention_edit(view)
            plain = m.layers[li](h, attention_mask=None, position_embeddings=(cos, sin))
            if li == 0 and layer0 == "none":
                assert edit is None
                h = plain
                continue
            got = m.layers[li](h, attention_mask=None, position_embeddings=(cos, sin), dvlm_edit=edit)
            if li == 0 and layer0 == "sink":
                rows = sorted(set(text) | {p for p in range(n) if p >= vis[0]})
                ref, _, _ = naive_layer(m.layers[li], h, cos, sin, zero_rows=rows, zero_cols=vis,
                                        sink_rows=text, sink_col=vis[0])
            else:
                ref, _, _ = naive_layer(m.layers[li], h, cos, sin, zero_rows=text, zero_cols=vis)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            assert (got - plain).abs().max() > 1e-2  # the edit does something
            h = got
        # no edit from shallow_mid_layer on
        view = View(step=0, layer=2, n_layers=len(m.layers), seq=seq, roles=roles, positions=torch.arange(n),
                    hidden=h, embeds0=h[0], ratio=1.0, acting=True)
        assert method.attention_edit(view) is None


# ----------------------------------------------------------------------------- middle + deep
SETTINGS = {
    # fusion at layer 1 (any cosine < 1.01), about half the tokens kept, deep exit before layer 3
    "middle_then_exit": dict(mid=0, lt=1.01, dc=-2.0, dp=1, fusion=1),
    # fusion at layer 1, every token still "matters" in the deep check: no exit
    "middle_no_exit": dict(mid=0, lt=1.01, dc=1.01, dp=1, fusion=1),
    # shallow stage (the 7B sink variant) on layer 0, layer 1 in no stage, fusion at layer 2
    "sink_then_middle": dict(mid=1, lt=1.01, dc=-2.0, dp=1, fusion=2, layer0="sink"),
}
CASES = [("middle_then_exit", q) for q in QUERY_SETS] + [("middle_no_exit", "masked_response"),
                                                         ("sink_then_middle", "masked_response")]


@pytest.mark.parametrize("setting,query_set", CASES)
def test_middle_and_deep_match_naive(tiny_model, seq_factory, setting, query_set):
    s = dict(SETTINGS[setting])
    fusion = s.pop("fusion")
    seq = seq_factory(commit=[(0, 300), (3, 301)])  # masked and unmasked answer slots
    ref = naive_visipruner(tiny_model, seq, tt=gap_threshold, query_set=query_set, **s)
    tt = ref["tt"]
    n_vis = seq.n_visual()
    k = sum(1 for x in ref["diag"][fusion][1] if x > tt)
    assert 0 < k < n_vis  # the setting exercises a real selection

    method = VisiPruner(shallow_mid_layer=s["mid"], layer_threshold=s["lt"], tokens_threshold=tt,
                        deep_exit_cos=s["dc"], deep_exit_patience=s["dp"], query_set=query_set,
                        shallow_layer0=s.get("layer0", "cross"))
    out, kept = run_engine(tiny_model, seq, method)
    assert kept == ref["kept"]
    assert method.fusion_layer == ref["fusion"] == fusion
    assert method.exit_layer == ref["exit"]
    assert out.keep.tolist() == ref["keep_prompt"]
    torch.testing.assert_close(out.logits, ref["logits"], rtol=1e-4, atol=1e-4)
    expect = {"middle_then_exit": [n_vis, n_vis, k, 0], "middle_no_exit": [n_vis, n_vis, k, k],
              "sink_then_middle": [n_vis, n_vis, n_vis, k]}[setting]
    assert kept == expect


def test_fusion_layer_search_uses_layer_threshold(tiny_model, seq_factory):
    """A layer threshold just under layer 1's smallest cosine: layer 1 is not the fusion layer;
    layer 2 is checked against the same threshold, and the engine agrees with the reference on
    whether it fires (on the seed-0 tiny model it does not: nothing is pruned)."""
    seq = seq_factory(commit=[(0, 300), (3, 301)])
    probe = naive_visipruner(tiny_model, seq, mid=0, lt=-2.0, tt=0.0, dc=-2.0, dp=1)
    lt = min(probe["diag"][1][0]) - 1e-4
    ref = naive_visipruner(tiny_model, seq, mid=0, lt=lt, tt=gap_threshold, dc=-2.0, dp=1)
    assert ref["fusion"] != 1
    tt = ref["tt"] if ref["fusion"] is not None else 0.0
    method = VisiPruner(shallow_mid_layer=0, layer_threshold=lt, tokens_threshold=tt, deep_exit_cos=-2.0,
                        deep_exit_patience=1)
    out, kept = run_engine(tiny_model, seq, method)
    assert method.fusion_layer == ref["fusion"]
    assert kept == ref["kept"]
    torch.testing.assert_close(out.logits, ref["logits"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- deep counter
def _synthetic_request(n, vis, matters: bool, dh=4):
    """One head, one query row: o mostly from a text key; one visual token carries a large
    share with an orthogonal value when `matters` (cos(o - c, o) ~ 0.6), else a negligible one."""
    probs = torch.full((n,), 1e-6)
    probs[0] = 1.0
    probs[vis[0]] = 1.0 if matters else 1e-6
    probs = probs / probs.sum()
    values = torch.zeros(n, dh)
    values[:, 0] = 1.0
    values[vis, 0] = 0.0
    values[vis, 1] = 1.0
    return probs[None, None], values[None]


@pytest.mark.parametrize("consecutive", [False, True])
def test_deep_exit_counter(consecutive):
    """The counter counts deep layers where no visual token matters: cumulative (the authors'
    `exit_indicator += ...`) or consecutive; all visual tokens go once it reaches the patience."""
    T, n = 10, 12
    roles = torch.tensor([Roles.TEXT] * 2 + [VIS] * 6 + [Roles.TEXT] * 2 + [Roles.RESPONSE] * 2)
    vis = torch.nonzero(roles == VIS).squeeze(1)
    # layer 1: fusion (threshold > 1), every token kept; then deep layers 2..: pattern below
    pattern = {2: False, 3: True, 4: False, 5: True, 6: True, 7: True}  # True = a token matters
    method = VisiPruner(shallow_mid_layer=0, layer_threshold=1.01, tokens_threshold=-1.0, deep_exit_cos=0.999,
                        deep_exit_patience=3, query_set="last_prompt_token", deep_consecutive=consecutive)
    scores, decided_at, requested = {}, None, []
    for li in range(T):
        view = View(step=0, layer=li, n_layers=T, seq=None, roles=roles, positions=torch.arange(n),
                    hidden=None, embeds0=torch.zeros(n, 1), ratio=1.0, acting=True, scores=scores)
        d = method.decide(view)
        if d is not None:
            assert d.keep.numel() == 0
            decided_at = li
            break
        req = method.score_request(view)
        if req is None:
            continue
        requested.append(li)
        assert req.query_index.tolist() == [9] and req.keep_heads and req.keep_values
        req.heads, req.values = _synthetic_request(n, vis, pattern.get(li, False))
        scores[li] = req
    assert requested[0] == 1  # layer 0 = shallow_mid_layer is in no stage
    # deep checks at layers 2..8 (scores of layer li are read before layer li + 1); quiet at 2, 4, 8.
    # cumulative: 1, 1, 2, 2, 2, 2, 3 -> exit before layer 9; consecutive: 1, 0, 1, 0, 0, 0, 1 -> never
    if consecutive:
        assert decided_at is None
        assert requested == list(range(1, T - 1))  # the last layer is never scored
    else:
        assert decided_at == 9 and method.exit_layer == 9


# ----------------------------------------------------------------------------- no-op + steps
def test_never_triggering_thresholds_reproduce_unpruned(tiny_model, doc_images, seq_factory):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    seq = seq_factory()
    base_eng = Engine(tiny_model, NoPruning(), FirstStep())
    base_eng.recorder.start_sample()
    base = base_eng.forward(seq, 0, torch.arange(seq.gen_length))
    noop = dict(shallow_mid_layer=0, layer_threshold=-2.0, deep_exit_cos=-2.0)  # scores rows, never acts
    no_shallow = VisiPruner(shallow_mid_layer=1, stages=["middle", "deep"], layer_threshold=-2.0)
    for method in (VisiPruner(**noop), no_shallow):
        out, kept = run_engine(tiny_model, seq, method)
        assert torch.equal(out.logits, base.logits) and out.keep is None
        assert kept == [seq.n_visual()] * len(tiny_model.layers)

    preset = GenPreset(gen_length=8, block_length=8, steps=2, think=None, stop=[])
    a = Generator(tiny_model, NoPruning(), FirstStep(), preset)
    b = Generator(tiny_model, VisiPruner(**noop), FirstStep(), preset)
    assert a.generate("What is the date?", [doc_images[1]]) == b.generate("What is the date?", [doc_images[1]])
    assert a.recorder.current.output_ids == b.recorder.current.output_ids


@pytest.mark.parametrize("persist,exit_", [("state", True), ("replay", False)])
def test_persistence_across_steps(tiny_model, seq_factory, doc_images, persist, exit_):
    """Step 0 acts (fusion at layer 1; exit before layer 3, or none); `state`: later steps run on
    the final kept prompt in every layer (no image after an exit); `replay`: they re-apply the
    decisions at the same layers."""
    from dvlm_exp.decoding.generator import GenPreset, Generator

    q = "What is the date?"
    probe = naive_visipruner(tiny_model, seq_factory(think=None, question=q), mid=0, lt=1.01, tt=gap_threshold,
                             dc=-2.0, dp=1)
    tt = probe["tt"]
    method = VisiPruner(shallow_mid_layer=0, layer_threshold=1.01, tokens_threshold=tt,
                        deep_exit_cos=-2.0 if exit_ else 1.01, deep_exit_patience=1)
    steps = 3
    gen = Generator(tiny_model, method, FirstStep(persist=persist),
                    GenPreset(gen_length=8, block_length=8, steps=steps, think=None, stop=[]))
    gen.generate(q, [doc_images[0]])
    rec = gen.recorder.current
    n_vis = rec.n_visual
    k = rec.kept_by_step_layer[(0, 2)]
    assert k == sum(1 for x in probe["diag"][1][1] if x > tt) and 0 < k < n_vis
    first = [n_vis, n_vis, k, 0 if exit_ else k]
    for step in range(steps):
        got = [rec.kept_by_step_layer[(step, li)] for li in range(4)]
        if step == 0 or persist == "replay":
            assert got == first, step
        else:
            assert got == [first[-1]] * 4, step
