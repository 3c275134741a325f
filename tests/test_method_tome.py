"""ToMe (bipartite soft matching on the LLM input) against a naive merge loop on the tiny model.

The reference keeps a plain list of tokens (feature, size, member list), splits it into
A (even) / B (odd) each round, finds each A token's most cosine-similar B token in float64,
merges the r strongest pairs one by one by size-weighted average, and repeats until the
target count. The engine's kept set, its merged hidden states / persisted input embeddings,
and its logits are compared with that.
"""

from __future__ import annotations

import math

import pytest
import torch

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.pruning.tome import ToMe
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
def naive_tome(feats: torch.Tensor, target: int, rounds: int):
    """Returns [(place, members, merged feature)] in sequence order: `place` is the original
    index whose slot the token occupies (the B token others merged into), `members` every
    original index folded into it."""
    n = feats.shape[0]
    tokens = [{"place": i, "f": feats[i].double(), "size": 1, "members": [i]} for i in range(n)]
    r_fixed = max(1, math.ceil((n - target) / rounds))
    while len(tokens) > target:
        t = len(tokens)
        r = min(r_fixed, t // 2, t - target)
        A = list(range(0, t, 2))
        B = list(range(1, t, 2))
        fB = torch.stack([tokens[b]["f"] for b in B])  # [|B|, d] float64
        normB = fB.norm(dim=1)
        matches = []  # (similarity, a, b)
        for a in A:
            fa = tokens[a]["f"]
            sims = ((fB @ fa) / (normB * fa.norm())).tolist()  # cosine of a with every B token
            best = max(range(len(B)), key=sims.__getitem__)  # first B on ties
            matches.append((sims[best], a, B[best]))
        matches.sort(key=lambda m: (-m[0], m[1]))  # strongest first, lower A index on ties
        gone = set()
        for _, a, b in matches[:r]:
            ta, tb = tokens[a], tokens[b]
            tb["f"] = (tb["f"] * tb["size"] + ta["f"] * ta["size"]) / (tb["size"] + ta["size"])
            tb["size"] += ta["size"]
            tb["members"] = tb["members"] + ta["members"]
            gone.add(a)
        tokens = [tok for i, tok in enumerate(tokens) if i not in gone]
    return [(tok["place"], sorted(tok["members"]), tok["f"]) for tok in tokens]


def naive_hidden_at(model, seq, layer_idx):
    """Hidden states entering layer `layer_idx` on the unpruned sequence, by hand."""
    with torch.no_grad():
        h = torch.cat([seq.prompt_embeds, model.embed_tokens(seq.response_ids)])[None]
        cos_sin = model.rotary_emb(h, torch.arange(h.shape[1])[None])
        for layer in model.layers[:layer_idx]:
            h = layer(h, attention_mask=None, position_embeddings=cos_sin)
    return h[0]


def kept_visual(seq, keep) -> list[int]:
    vis_positions = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    return torch.searchsorted(vis_positions, keep[seq.roles[keep] == Roles.VISUAL]).tolist()


def merged_sequence(x: torch.Tensor, roles: torch.Tensor, groups) -> torch.Tensor:
    """Rows of x [n, d] after the merge: non-visual rows as they are; each group one row at
    its place, the plain mean of its members' rows (written as a loop)."""
    vis = torch.nonzero(roles == Roles.VISUAL).squeeze(1).tolist()
    by_place = {vis[place]: [vis[m] for m in members] for place, members, _ in groups}
    rows = []
    for i in range(x.shape[0]):
        if roles[i] != Roles.VISUAL:
            rows.append(x[i])
        elif i in by_place:
            acc = torch.zeros_like(x[i], dtype=torch.float64)
            for m in by_place[i]:
                acc += x[m].double()
            rows.append((acc / len(by_place[i])).to(x.dtype))
    return torch.stack(rows)


def run_rest(model, h, first_layer, gen_length):
    """Layers first_layer.. on h [1, n, d] with positions 0..n-1 (renumbered); response logits."""
    with torch.no_grad():
        cos_sin = model.rotary_emb(h, torch.arange(h.shape[1])[None])
        for layer in model.layers[first_layer:]:
            h = layer(h, attention_mask=None, position_embeddings=cos_sin)
        return model.lm_head(model.norm(h[:, -gen_length:]))[0].float()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ratio,rounds", [(0.25, 26), (0.3, 2)])
def test_layer0_merge_matches_naive_loop(tiny_model, seq_factory, ratio, rounds):
    seq = seq_factory(commit=[(2, 300)])
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    n = vis.numel()
    target = round(ratio * n)
    groups = naive_tome(seq.prompt_embeds[vis], target, rounds)
    assert len(groups) == target
    assert sorted(m for _, members, _ in groups for m in members) == list(range(n))

    eng = Engine(tiny_model, ToMe(ratio=ratio, layer=0, rounds=rounds), FirstStep(), position_ids="renumber")
    eng.recorder.start_sample()
    out = eng.forward(seq, 0, torch.arange(seq.gen_length))
    # survivors: each group's place, in order
    assert kept_visual(seq, out.keep) == [place for place, _, _ in groups]
    # persisted input embeddings: the merged rows equal the reference's size-weighted averages
    assert out.embeds is not None and out.embeds.shape[0] == out.keep.numel()
    kept_roles = seq.roles[out.keep]
    merged_rows = out.embeds[kept_roles == Roles.VISUAL]
    ref_rows = torch.stack([f for _, _, f in groups]).float()
    torch.testing.assert_close(merged_rows, ref_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.embeds[kept_roles != Roles.VISUAL], seq.prompt_embeds[seq.roles != Roles.VISUAL])
    # the forward is the model run from scratch on the merged, shortened sequence
    h0 = torch.cat([seq.prompt_embeds, tiny_model.embed_tokens(seq.response_ids)])
    h = merged_sequence(h0, seq.all_roles(), groups)[None]
    torch.testing.assert_close(out.logits, run_rest(tiny_model, h, 0, seq.gen_length), rtol=1e-4, atol=1e-4)


def test_later_layer_merges_hidden_states_and_persists_merged_embeddings(tiny_model, seq_factory):
    K, ratio, rounds = 2, 0.2, 4
    seq = seq_factory(image=1)
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    hK = naive_hidden_at(tiny_model, seq, K)
    groups = naive_tome(hK[vis], round(ratio * vis.numel()), rounds)

    eng = Engine(tiny_model, ToMe(ratio=ratio, layer=K, rounds=rounds), FirstStep(), position_ids="renumber")
    eng.recorder.start_sample()
    out = eng.forward(seq, 0, torch.arange(seq.gen_length))
    assert kept_visual(seq, out.keep) == [place for place, _, _ in groups]
    # layers >= K run on the merged hidden states (positions renumbered)
    roles = seq.all_roles()
    ref = run_rest(tiny_model, merged_sequence(hK, roles, groups)[None], K, seq.gen_length)
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
    # what persists for later steps: the same groups' means of the input embeddings
    emb_ref = merged_sequence(seq.prompt_embeds, seq.roles, groups)
    torch.testing.assert_close(out.embeds, emb_ref, rtol=1e-5, atol=1e-6)
    rec = eng.recorder.current
    assert [rec.kept_by_step_layer[(0, li)] for li in range(tiny_model.num_layers)] == \
        [vis.numel()] * K + [len(groups)] * (tiny_model.num_layers - K)


def test_ratio_one_is_identical_to_no_pruning(tiny_model, doc_images):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    preset = GenPreset(gen_length=8, block_length=8, steps=4, think=None, stop=[])
    base = Generator(tiny_model, NoPruning(), FirstStep(), preset, position_ids="renumber")
    full = Generator(tiny_model, ToMe(ratio=1.0), FirstStep(), preset, position_ids="renumber")
    a = base.generate("What is the total?", [doc_images[1]], sample_id=4)
    b = full.generate("What is the total?", [doc_images[1]], sample_id=4)
    assert base.recorder.current.output_ids == full.recorder.current.output_ids
    assert a == b
    n_vis = full.recorder.current.n_visual
    assert set(full.recorder.current.kept_by_step_layer.values()) == {n_vis}


@pytest.mark.parametrize("act", [0, 2])
def test_later_steps_see_the_merged_sequence(tiny_model, doc_images, act):
    """From the acting step on, every layer of every step runs on the merged tokens, whose
    input embeddings are the means of their members (from a naive merge of the acting step)."""
    from dvlm_exp.decoding.generator import GenPreset, Generator

    ratio, rounds, steps = 0.25, 3, 4
    schedule = FirstStep() if act == 0 else AtStep(step=act)
    gen = Generator(tiny_model, ToMe(ratio=ratio, rounds=rounds), schedule,
                    GenPreset(gen_length=8, block_length=8, steps=steps, think=None, stop=[]),
                    position_ids="renumber")
    seen = {}
    forward = gen.engine.forward

    def spy(seq, step, rows):
        seen[step] = seq
        return forward(seq, step, rows)

    gen.engine.forward = spy
    gen.generate("What is the date?", [doc_images[0]], sample_id=1)
    rec = gen.recorder.current
    n_vis, T = rec.n_visual, tiny_model.num_layers
    kept = round(ratio * n_vis)
    for step in range(steps):
        for layer in range(T):
            assert rec.kept_by_step_layer[(step, layer)] == (n_vis if step < act else kept), (step, layer)

    full = seen[act]
    assert full.n_visual() == n_vis
    vis = torch.nonzero(full.roles == Roles.VISUAL).squeeze(1)
    groups = naive_tome(full.prompt_embeds[vis], kept, rounds)
    expect_embeds = merged_sequence(full.prompt_embeds, full.roles, groups)
    expect_positions = [int(full.positions[i]) for i in range(full.roles.numel())
                        if full.roles[i] != Roles.VISUAL] + [int(full.positions[vis[p]]) for p, _, _ in groups]
    for step in range(act + 1, steps):
        later = seen[step]
        assert later.n_visual() == kept
        assert sorted(later.positions.tolist()) == sorted(expect_positions)
        torch.testing.assert_close(later.prompt_embeds, expect_embeds, rtol=1e-5, atol=1e-6)
