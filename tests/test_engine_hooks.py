"""The engine's generalised hooks against hand-run references on the tiny model: merges,
several decisions per forward, the three persistence modes, after-step pruning, visual layer
skipping, and the step schedules' semantics through whole generations."""

from __future__ import annotations

import pytest
import torch

from dvlm_exp.engine import Decision, Engine, Roles
from dvlm_exp.decoding.generator import GenPreset, Generator
from dvlm_exp.pruning.base import PruneMethod, keep_count
from dvlm_exp.pruning.fastv import FastV
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.schedules.at_step import AtStep
from dvlm_exp.schedules.confidence import Confidence
from dvlm_exp.schedules.every_step import EveryStep
from dvlm_exp.schedules.first_step import FirstStep
from dvlm_exp.schedules.late_step import LateStep
from dvlm_exp.schedules.progressive import Progressive
from dvlm_exp.schedules.start_frac import StartFrac


@pytest.fixture(scope="module")
def seq_factory(tiny_model, doc_images):
    def make(gen_length=8):
        ids = tiny_model.prompt_ids("What is the total?", n_images=1, think="no_think")
        seq, _ = tiny_model.prepare(ids, [doc_images[0]], gen_length)
        return seq

    return make


class Scripted(PruneMethod):
    """Takes fixed decisions: {layer: Decision-maker(view)}; optional after-step and skips."""

    name = "scripted"

    def __init__(self, at=None, after=None, skip=(), **kw):
        super().__init__(**kw)
        self.at, self.after, self.skip = dict(at or {}), after, set(skip)

    def decide(self, view):
        f = self.at.get(view.layer)
        return None if f is None else f(view)

    def after_step(self, view):
        return None if self.after is None else self.after(view)

    def skips_visual(self, view):
        return view.layer in self.skip


def _every_other(view):
    return Decision(keep=torch.arange(0, view.n_visual, 2))


def _merge_pairs(view):
    """Keep even visual tokens; odd token 2i+1 folds into kept token i with weight 3."""
    n = view.n_visual
    keep = torch.arange(0, n, 2)
    src = torch.arange(1, n, 2)
    return Decision(keep=keep, merge_src=src, merge_dst=src // 2, merge_w=torch.full((src.numel(),), 3.0))


def _run_layers(model, h, cos_sin, layers):
    for layer in layers:
        h = layer(h, attention_mask=None, position_embeddings=cos_sin)
    return h


def _logits(model, h, G):
    return model.lm_head(model.norm(h[:, -G:]))[0].float()


def _input(model, seq):
    h = torch.cat([seq.prompt_embeds, model.embed_tokens(seq.response_ids)])[None]
    return h, model.rotary_emb(h, torch.arange(h.shape[1])[None])


def _forward(model, method, seq, step=0, schedule=None, **kw):
    eng = Engine(model, method, schedule or FirstStep(), **kw)
    eng.recorder.start_sample()
    return eng, eng.forward(seq, step, torch.arange(seq.gen_length))


def test_merge_decision_matches_manual_weighted_mean(tiny_model, seq_factory):
    seq = seq_factory()
    K = 2
    eng, out = _forward(tiny_model, Scripted(at={K: _merge_pairs}), seq)
    roles = seq.all_roles()
    vis = torch.nonzero(roles == Roles.VISUAL).squeeze(1).tolist()
    with torch.no_grad():
        h, (cos, sin) = _input(tiny_model, seq)
        h = _run_layers(tiny_model, h, (cos, sin), tiny_model.layers[:K]).clone()
        e0 = torch.cat([seq.prompt_embeds, tiny_model.embed_tokens(seq.response_ids)]).clone()
        for x in (h[0], e0):  # by hand: kept = (1*even + 3*odd) / 4, pair by pair
            for i in range(0, len(vis) - 1, 2):
                x[vis[i]] = (x[vis[i]] + 3 * x[vis[i + 1]]) / 4
        keep = [i for i in range(roles.numel()) if roles[i] != Roles.VISUAL or vis.index(i) % 2 == 0]
        h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]  # position_ids keep
        ref = _logits(tiny_model, _run_layers(tiny_model, h, (cos, sin), tiny_model.layers[K:]), seq.gen_length)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    n_prompt = seq.prompt_embeds.shape[0]
    assert out.keep.tolist() == [i for i in keep if i < n_prompt]
    torch.testing.assert_close(out.embeds, e0[[i for i in keep if i < n_prompt]])


def test_two_decisions_in_one_forward_compose(tiny_model, seq_factory):
    seq = seq_factory()
    eng, out = _forward(tiny_model, Scripted(at={1: _every_other, 3: _every_other}), seq, position_ids="renumber")
    n_vis = seq.n_visual()
    rec = eng.recorder.current
    assert [rec.kept_by_step_layer[(0, li)] for li in range(4)] == [n_vis, (n_vis + 1) // 2, (n_vis + 1) // 2,
                                                                    ((n_vis + 1) // 2 + 1) // 2]
    vis = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    kept_vis = [int(i) for i in out.keep if seq.roles[i] == Roles.VISUAL]
    assert kept_vis == vis[::4].tolist()  # every other of every other
    with torch.no_grad():  # renumbered positions: a fresh arange after each gather
        h, cs = _input(tiny_model, seq)
        roles = seq.all_roles()
        for lo, hi in ((0, 1), (1, 3), (3, 4)):
            if lo:
                v = torch.nonzero(roles == Roles.VISUAL).squeeze(1)
                keep = torch.tensor(sorted(set(range(roles.numel())) - set(v[1::2].tolist())))
                h, roles = h[:, keep], roles[keep]
                cs = tiny_model.rotary_emb(h, torch.arange(h.shape[1])[None])
            h = _run_layers(tiny_model, h, cs, tiny_model.layers[lo:hi])
        ref = _logits(tiny_model, h, seq.gen_length)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("persist", ["state", "replay", "none"])
def test_persistence_modes(tiny_model, seq_factory, persist):
    """After a decision at layer 2 of step 0, what does step 1 run on?"""
    seq = seq_factory()
    n_vis = seq.n_visual()
    half = (n_vis + 1) // 2
    eng = Engine(tiny_model, Scripted(at={2: _every_other}), FirstStep(persist=persist))
    eng.begin_sample(4)
    eng.recorder.start_sample()
    out = eng.forward(seq, 0, torch.arange(seq.gen_length))
    assert (out.keep is not None) == (persist == "state")
    if out.keep is not None:
        seq = seq.keep_prompt(out.keep)
    out1 = eng.forward(seq, 1, torch.arange(seq.gen_length))
    kept1 = [eng.recorder.current.kept_by_step_layer[(1, li)] for li in range(4)]
    expected = {"state": [half] * 4, "replay": [n_vis, n_vis, half, half], "none": [n_vis] * 4}[persist]
    assert kept1 == expected
    if persist == "replay":  # step 1 replays step 0's decision: same logits as a fresh step-0 forward
        _, again = _forward(tiny_model, Scripted(at={2: _every_other}), seq_factory(), step=0)
        torch.testing.assert_close(out1.logits, again.logits)


def test_after_step_prunes_state_for_later_steps_only(tiny_model, doc_images):
    calls = []

    def after(view):
        calls.append(view.step)
        assert view.hidden is None and view.layer == view.n_layers
        return Decision(keep=torch.arange(view.n_visual - 3, view.n_visual))  # the last 3 visual tokens

    gen = Generator(tiny_model, Scripted(after=after), FirstStep(), _preset(), seed=0)
    gen.generate("What is the total?", [doc_images[0]], sample_id=0)
    rec = gen.recorder.samples[-1]
    assert calls == [0]
    steps = sorted({s for s, _ in rec.kept_by_step_layer})
    assert all(rec.kept_by_step_layer[(0, li)] == rec.n_visual for li in range(4))
    assert all(rec.kept_by_step_layer[(s, li)] == 3 for s in steps[1:] for li in range(4))


def test_skipped_layer_carries_visual_states(tiny_model, seq_factory):
    seq = seq_factory()
    eng, out = _forward(tiny_model, Scripted(skip={1, 2}), seq)
    roles = seq.all_roles()
    nv = torch.nonzero(roles != Roles.VISUAL).squeeze(1)
    with torch.no_grad():
        h, (cos, sin) = _input(tiny_model, seq)
        for li, layer in enumerate(tiny_model.layers):
            if li in (1, 2):
                h = h.clone()
                h[:, nv] = layer(h[:, nv], attention_mask=None, position_embeddings=(cos[:, nv], sin[:, nv]))
            else:
                h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
        ref = _logits(tiny_model, h, seq.gen_length)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    rec = eng.recorder.current
    assert rec.kept_by_step_layer[(0, 1)] == 0 and rec.kept_by_step_layer[(0, 3)] == seq.n_visual()
    assert rec.layer_calls[(nv.numel(), nv.numel())] == 2 and out.keep is None


# ----------------------------------------------------------------------------- schedules
def _preset(steps=8):
    return GenPreset(gen_length=8, block_length=8, steps=steps, think=None, stop=[], honor_until=False)


def _kept(gen, layer):
    rec = gen.recorder.samples[-1]
    return [v for (s, li), v in sorted(rec.kept_by_step_layer.items()) if li == layer]


def _gen(model, images, method, schedule, steps=8):
    gen = Generator(model, method, schedule, _preset(steps), seed=0)
    gen.generate("What is the total?", [images[0]], sample_id=0)
    return gen


@pytest.mark.parametrize("schedule,start", [(StartFrac(frac=0.5), 4), (LateStep(), 6), (AtStep(step=3), 3),
                                            (StartFrac(frac=0.25), 2)])
def test_start_schedules_act_once_and_persist(tiny_model, doc_images, schedule, start):
    ratio = 0.25
    gen = _gen(tiny_model, doc_images, FastV(ratio=ratio, layer=2, query_set="masked_response"), schedule)
    n = gen.recorder.samples[-1].n_visual
    k = keep_count(n, ratio)
    assert _kept(gen, 0) == [n] * (start + 1) + [k] * (8 - start - 1)  # layer 0: full through the acting step
    assert _kept(gen, 3) == [n] * start + [k] * (8 - start)


def test_progressive_keeps_falling(tiny_model, doc_images):
    ratio = 0.2
    gen = _gen(tiny_model, doc_images, FastV(ratio=ratio, layer=1, query_set="masked_response"),
               Progressive(fracs=[0.0, 0.25, 0.5, 0.75]))
    n = gen.recorder.samples[-1].n_visual
    stage = [keep_count(n, 1 - (1 - ratio) * (i + 1) / 4) for i in range(4)]
    assert _kept(gen, 3) == [stage[0]] * 2 + [stage[1]] * 2 + [stage[2]] * 2 + [stage[3]] * 2
    assert stage[-1] == keep_count(n, ratio) and stage == sorted(stage, reverse=True)


def test_every_step_reselects_from_the_full_set(tiny_model, doc_images):
    gen = _gen(tiny_model, doc_images, FastV(ratio=0.3, layer=2, query_set="masked_response"), EveryStep(start=2))
    n = gen.recorder.samples[-1].n_visual
    assert _kept(gen, 0) == [n] * 8  # nothing persists
    assert _kept(gen, 2) == [n] * 2 + [keep_count(n, 0.3)] * 6


def test_confidence_trigger_fires_after_threshold(tiny_model, doc_images):
    seen = []

    class Spy(Confidence):
        def observe(self, step, confidence):
            seen.append(confidence)
            super().observe(step, confidence)

    # threshold from a first run's observed confidences: fire after the step whose mean is the 3rd largest
    probe = Spy(threshold=1.0)
    _gen(tiny_model, doc_images, FastV(ratio=0.3, layer=2, query_set="masked_response"), probe)
    conf = list(seen)
    assert len(conf) == 8 and probe.steps() == []
    thr = sorted(conf)[-3]
    first = next(i for i, c in enumerate(conf) if c >= thr)
    seen.clear()
    sched = Spy(threshold=thr)
    gen = _gen(tiny_model, doc_images, FastV(ratio=0.3, layer=2, query_set="masked_response"), sched)
    n = gen.recorder.samples[-1].n_visual
    fire = first + 1
    assert sched.steps() == ([fire] if fire < 8 else [])
    if fire < 8:
        assert _kept(gen, 3) == [n] * fire + [keep_count(n, 0.3)] * (8 - fire)
    forced = _gen(tiny_model, doc_images, FastV(ratio=0.3, layer=2), Confidence(threshold=1.0, max_step=5))
    assert _kept(forced, 3) == [n] * 5 + [keep_count(n, 0.3)] * 3


def test_no_op_decisions_reproduce_unpruned_generation(tiny_model, doc_images):
    base = _gen(tiny_model, doc_images, NoPruning(), FirstStep())
    for sched in (FirstStep(persist="replay"), EveryStep(), Progressive()):
        gen = _gen(tiny_model, doc_images, FastV(ratio=1.0, layer=2, query_set="all"), sched)
        assert gen.recorder.samples[-1].output_ids == base.recorder.samples[-1].output_ids


def test_needed_head_rows_same_answer_fewer_rows(tiny_model, doc_images):
    """task.gen.head_rows=needed computes logits only for pickable slots: same answers, and the
    LM-head rows equal the sum over steps of masked slots before the block end."""
    outs = {}
    for mode in ("all", "needed"):
        preset = GenPreset(gen_length=8, block_length=4, steps=4, think=None, stop=[], honor_until=False, head_rows=mode)
        gen = Generator(tiny_model, FastV(ratio=0.5, layer=2, query_set="masked_response"), FirstStep(), preset, seed=0)
        gen.generate("What is the total?", [doc_images[1]], sample_id=3)
        outs[mode] = gen.recorder.samples[-1]
    assert outs["needed"].output_ids == outs["all"].output_ids
    assert outs["all"].lm_head_rows == 8 * 4
    # block 0: 4, 2 masked slots before the block end; block 1 the same
    assert outs["needed"].lm_head_rows == (4 + 2) * 2


def test_probes_watch_without_changing_anything(tiny_model, doc_images):
    """A probe asking for rows at every layer of every step (alongside the method's own request)
    gets what a lone request would, and the run's output, kept tokens and scoring FLOPs are
    those of the run without it."""
    from dvlm_exp.engine.attention import ScoreRequest

    class Probe:
        def __init__(self):
            self.reqs, self.forwards, self.conf = {}, [], []

        def score_request(self, view):
            r = ScoreRequest(view.masked_response_index() if view.seq.is_mask.any() else view.response_index)
            self.reqs[(view.step, view.layer)] = r
            return r

        def after_forward(self, view, logits, rows):
            self.forwards.append((view.step, view.n_visual, logits.shape[0]))

        def observe(self, step, confidence):
            self.conf.append(confidence)

    def run(probes):
        gen = Generator(tiny_model, FastV(ratio=0.3, layer=2, query_set="masked_response"), FirstStep(), _preset(4),
                        seed=0, probes=probes)
        gen.generate("What is the total?", [doc_images[0]], sample_id=0)
        return gen.recorder.samples[-1]

    probe = Probe()
    a, b = run([]), run([probe])
    assert a.output_ids == b.output_ids and a.kept_by_step_layer == b.kept_by_step_layer
    assert a.scoring_flops == b.scoring_flops > 0
    assert sorted(probe.reqs) == [(s, li) for s in range(4) for li in range(4)]
    assert all(r.column_mean is not None for r in probe.reqs.values())
    k = keep_count(a.n_visual, 0.3)
    assert [f[:2] for f in probe.forwards] == [(0, k), (1, k), (2, k), (3, k)] and len(probe.conf) == 4
