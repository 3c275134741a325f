"""DivPrune against a naive reference on the tiny model.

The reference builds the pairwise cosine-distance matrix row by row in float64 and runs the
greedy max-min selection with explicit Python loops (both first-pick rules), so a bug in the
distance, the pivot, the greedy update, the count or the index bookkeeping shows up as a
different kept set. The pruned forward is compared with the model run by hand on the
shortened sequence (renumbered positions).
"""

from __future__ import annotations

import pytest
import torch

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.pruning.divprune import DivPrune
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


# ----------------------------------------------------------------------------- naive reference
def naive_distance(feats: torch.Tensor) -> list[list[float]]:
    """D[i][j] = 1 - cos(f_i, f_j), row by row in float64."""
    x = feats.double()
    n = x.shape[0]
    norms = [float(x[i].norm()) for i in range(n)]
    rows = []
    for i in range(n):
        dots = (x @ x[i]).tolist()
        rows.append([1.0 - dots[j] / (norms[i] * norms[j]) for j in range(n)])
    return rows


def naive_paper_pivot(D) -> int:
    """The token whose nearest other token is farthest (first on ties)."""
    n = len(D)
    best, best_val = None, None
    for i in range(n):
        nearest = min(D[i][j] for j in range(n) if j != i)
        if best is None or nearest > best_val:
            best, best_val = i, nearest
    return best


def naive_greedy(D, k: int, first: int) -> list[int]:
    """Greedy max-min: each pick is the unchosen token farthest from its nearest chosen one."""
    n = len(D)
    chosen, taken = [first], {first}
    min_dist = list(D[first])  # distance of every token to its nearest chosen token
    while len(chosen) < k:
        best, best_val = None, None
        for j in range(n):
            if j in taken:
                continue
            if best is None or min_dist[j] > best_val:
                best, best_val = j, min_dist[j]
        chosen.append(best)
        taken.add(best)
        for j in range(n):
            min_dist[j] = min(min_dist[j], D[best][j])
    return sorted(chosen)


def naive_divprune(feats, k, pivot, seed=None) -> list[int]:
    D = naive_distance(feats)
    n = len(D)
    if pivot == "paper":
        first = naive_paper_pivot(D)
    else:  # the method's contract: randint(0, N) from its generator, reseeded per sample
        first = int(torch.randint(0, n, (1,), generator=torch.Generator().manual_seed(seed)))
    return naive_greedy(D, k, first)


def naive_hidden_at(model, seq, layer_idx):
    """Hidden states entering layer `layer_idx` on the unpruned sequence, by hand."""
    with torch.no_grad():
        h = torch.cat([seq.prompt_embeds, model.embed_tokens(seq.response_ids)])[None]
        cos_sin = model.rotary_emb(h, torch.arange(h.shape[1])[None])
        for layer in model.layers[:layer_idx]:
            h = layer(h, attention_mask=None, position_embeddings=cos_sin)
    return h[0]


def kept_visual(seq, keep) -> list[int]:
    """Indices (among the sequence's visual tokens) of the kept visual tokens."""
    vis_positions = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    return torch.searchsorted(vis_positions, keep[seq.roles[keep] == Roles.VISUAL]).tolist()


def round_half_even(x: float) -> int:
    return round(x)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("pivot", ["paper", "random"])
def test_selection_matches_naive_and_forward_is_the_shortened_sequence(tiny_model, seq_factory, pivot):
    ratio, seed = 0.1, 1234
    seq = seq_factory(commit=[(1, 300)])
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    n = vis.numel()
    k = round_half_even(ratio * n)
    expected = naive_divprune(seq.prompt_embeds[vis], k, pivot, seed)

    method = DivPrune(ratio=ratio, layer=0, pivot=pivot, seed=0)
    method.reseed(seed)
    eng = Engine(tiny_model, method, FirstStep(), position_ids="renumber")
    eng.recorder.start_sample()
    rows = torch.arange(seq.gen_length)
    out = eng.forward(seq, 0, rows)
    assert kept_visual(seq, out.keep) == expected
    assert len(expected) == k
    assert set(torch.nonzero(seq.roles == Roles.TEXT).squeeze(1).tolist()) <= set(out.keep.tolist())
    assert out.embeds is None  # no merge: the kept input embeddings are sliced, not rewritten

    # the forward is the model run from scratch on the shortened sequence, positions 0..n'-1
    keep_vis = set(vis[expected].tolist())
    prompt_keep = [i for i in range(seq.prompt_embeds.shape[0]) if seq.roles[i] != Roles.VISUAL or i in keep_vis]
    with torch.no_grad():
        h = torch.cat([seq.prompt_embeds[prompt_keep], tiny_model.embed_tokens(seq.response_ids)])[None]
        cos_sin = tiny_model.rotary_emb(h, torch.arange(h.shape[1])[None])
        for layer in tiny_model.layers:
            h = layer(h, attention_mask=None, position_embeddings=cos_sin)
        ref = tiny_model.lm_head(tiny_model.norm(h[:, -seq.gen_length:]))[0].float()
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


def test_selection_at_a_later_layer_uses_that_layers_hidden_states(tiny_model, seq_factory):
    K, ratio = 2, 0.05
    seq = seq_factory(image=1)
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    h = naive_hidden_at(tiny_model, seq, K)
    expected = naive_divprune(h[vis], round_half_even(ratio * vis.numel()), "paper")

    eng = Engine(tiny_model, DivPrune(ratio=ratio, layer=K, pivot="paper"), FirstStep(), position_ids="renumber")
    eng.recorder.start_sample()
    out = eng.forward(seq, 0, torch.arange(seq.gen_length))
    assert kept_visual(seq, out.keep) == expected
    # layers < K ran on every visual token, layers >= K on the kept ones
    rec = eng.recorder.current
    assert [rec.kept_by_step_layer[(0, li)] for li in range(tiny_model.num_layers)] == \
        [vis.numel()] * K + [len(expected)] * (tiny_model.num_layers - K)


def test_random_pivot_is_seeded_per_sample(tiny_model, seq_factory):
    seq = seq_factory()
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)

    def kept(seed):
        m = DivPrune(ratio=0.02, layer=0, pivot="random")
        m.reseed(seed)
        eng = Engine(tiny_model, m, FirstStep())
        eng.recorder.start_sample()
        return kept_visual(seq, eng.forward(seq, 0, torch.arange(seq.gen_length)).keep)

    a, b, c = kept(7), kept(7), kept(8)
    assert a == b
    pivots = {int(torch.randint(0, vis.numel(), (1,), generator=torch.Generator().manual_seed(s))) for s in (7, 8)}
    assert len(pivots) == 2 and a != c  # another pivot, another greedy path
    # the paper pivot does not depend on the seed
    m1, m2 = DivPrune(ratio=0.02, pivot="paper", seed=1), DivPrune(ratio=0.02, pivot="paper", seed=2)
    outs = []
    for m in (m1, m2):
        eng = Engine(tiny_model, m, FirstStep())
        eng.recorder.start_sample()
        outs.append(eng.forward(seq, 0, torch.arange(seq.gen_length)).keep.tolist())
    assert outs[0] == outs[1]


def test_ratio_one_is_identical_to_no_pruning(tiny_model, doc_images):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    preset = GenPreset(gen_length=8, block_length=8, steps=4, think=None, stop=[])
    base = Generator(tiny_model, NoPruning(), FirstStep(), preset, position_ids="renumber")
    full = Generator(tiny_model, DivPrune(ratio=1.0, pivot="random"), FirstStep(), preset, position_ids="renumber")
    a = base.generate("What is the total?", [doc_images[0]], sample_id=3)
    b = full.generate("What is the total?", [doc_images[0]], sample_id=3)
    assert base.recorder.current.output_ids == full.recorder.current.output_ids
    assert a == b
    n_vis = full.recorder.current.n_visual
    assert set(full.recorder.current.kept_by_step_layer.values()) == {n_vis}


@pytest.mark.parametrize("act", [0, 2])
def test_later_steps_run_on_the_selected_tokens(tiny_model, doc_images, act):
    """From the acting step on, every layer of every step sees exactly the kept set."""
    from dvlm_exp.decoding.generator import GenPreset, Generator

    ratio, steps = 0.25, 4
    schedule = FirstStep() if act == 0 else AtStep(step=act)
    gen = Generator(tiny_model, DivPrune(ratio=ratio, pivot="paper"), schedule,
                    GenPreset(gen_length=8, block_length=8, steps=steps, think=None, stop=[]),
                    position_ids="renumber", seed=5)
    seen = []  # (step, positions of the visual tokens in the input, kept positions or None)
    acting_embeds = []
    forward = gen.engine.forward

    def spy(seq, step, rows):
        out = forward(seq, step, rows)
        kept_pos = None if out.keep is None else seq.positions[out.keep].tolist()
        seen.append((step, seq.positions[seq.roles == Roles.VISUAL].tolist(), kept_pos))
        if out.keep is not None:
            acting_embeds.append(seq.prompt_embeds[seq.roles == Roles.VISUAL].clone())
        return out

    gen.engine.forward = spy
    gen.generate("What is the date?", [doc_images[0]], sample_id=2)
    rec = gen.recorder.current
    n_vis, T = rec.n_visual, tiny_model.num_layers
    kept = round_half_even(ratio * n_vis)
    for step in range(steps):
        for layer in range(T):
            assert rec.kept_by_step_layer[(step, layer)] == (n_vis if step < act else kept), (step, layer)
    (acting,) = [s for s in seen if s[0] == act]
    assert len(acting[1]) == n_vis and acting[2] is not None
    kept_vis_positions = sorted(set(acting[2]) & set(acting[1]))
    # the acting step selected the naive DivPrune subset of the visual embeddings it saw
    (emb,) = acting_embeds
    assert kept_vis_positions == [acting[1][i] for i in naive_divprune(emb, kept, "paper")]
    later = [s for s in seen if s[0] > act]
    assert len(later) == steps - 1 - act
    for _, vis_pos, kept_pos in later:
        assert kept_pos is None  # nothing is re-selected after the acting step
        assert vis_pos == kept_vis_positions  # later steps carry exactly the selected tokens
    for _, vis_pos, _ in [s for s in seen if s[0] < act]:
        assert len(vis_pos) == n_vis
    # the whole prompt after pruning has exactly n_visual - kept fewer tokens
    n_full = rec.baseline_forwards.most_common(1)[0][0]
    pruned_calls = sum(c for (nq, _), c in rec.layer_calls.items() if nq == n_full - (n_vis - kept))
    assert pruned_calls == (steps - act) * T
