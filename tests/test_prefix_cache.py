"""LaViDa's Prefix-DLM (dvlm_exp/engine/prefix.py, `model.prefix_cache`) on tiny official-layout
LaViDa checkpoints (LLaDA and Dream backbones).

Where the cache is exact. The official prefix_lm=True path (llada/generate.py, dream
generation_utils.py + DreamPrefixLMCache) prefills the prompt alone and feeds only the answer
afterwards, so the prompt never sees the answer. Our `mask_only` mode runs that as one full forward
with the prefix-LM mask per step; the cache must give the same logits (allclose) and the same ids,
unpruned and with FastV at step 0 under both position policies (with FastV the reference replays
the step-0 decision at the same layer: `persist: replay`, which is what a cache built in the
prefill holds). Where it is an approximation: compared with the default full-bidirectional run
(`prefix_cache: false`, what the models were trained with) every prompt row differs from layer 0
on, so answers may differ (test_prefix_mask_is_an_approximation_of_full_attention).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from PIL import Image

from dvlm_exp.engine import Engine
from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.prefix import PrefixEngine
from dvlm_exp.decoding.generator import GenPreset, Generator
from dvlm_exp.pruning.fastv import FastV
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.pruning.skip import LayerSkip
from dvlm_exp.pruning.visipruner import VisiPruner
from dvlm_exp.pruning.vtw import VTW
from dvlm_exp.schedules.at_step import AtStep
from dvlm_exp.schedules.first_step import FirstStep

SPECS = {"llada": dict(num_attention_heads=4, num_key_value_heads=4),
         "dream": dict(num_attention_heads=4, num_key_value_heads=2)}  # Dream: grouped KV heads
G = 8
PRESET = GenPreset(gen_length=G, block_length=G, steps=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from dvlm_exp.models.tiny_lavida import write_lavida_checkpoint

    root = tmp_path_factory.mktemp("lavida_prefix")
    return {bb: write_lavida_checkpoint(root / bb, bb, SPECS[bb], seed=3) for bb in ("llada", "dream")}


@pytest.fixture(scope="module")
def models(ckpts):
    from dvlm_exp.models.lavida import LaViDaDream, LaViDaLLaDA

    return {"llada": LaViDaLLaDA.from_pretrained(ckpts["llada"]), "dream": LaViDaDream.from_pretrained(ckpts["dream"])}


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def seqs(models):
    img = noise_image(500, 420, 1)
    out = {}
    for bb, m in models.items():
        seq, info = m.prepare(m.prompt_ids("What is written here?", 1), [img], G)
        out[bb] = seq
    return out


def fresh(seq):
    return replace(seq, response_ids=seq.response_ids.clone())


def sample(m, seq, prefix, pruner=None, schedule=None, position_ids="keep"):
    """Run the model's sampler through a Generator's engine; returns ids, per-step logits, record."""
    gen = Generator(m, pruner or NoPruning(), schedule or FirstStep(), PRESET, position_ids=position_ids,
                    prefix_cache=prefix)
    gen.recorder.start_sample()
    logs = []
    fwd = gen.engine.forward

    def logged(s, step, rows):
        out = fwd(s, step, rows)
        logs.append(out.logits.clone())
        return out

    gen.engine.forward = logged
    ids, _ = gen.sampler.generate(gen.engine, fresh(seq))
    return ids, logs, gen.recorder.current


METHODS = {
    "none": (lambda: NoPruning(), "keep"),
    "fastv_keep": (lambda: FastV(ratio=0.5, layer=1), "keep"),
    "fastv_renumber": (lambda: FastV(ratio=0.5, layer=1), "renumber"),
    "fastv_all_rows": (lambda: FastV(ratio=0.5, layer=1, query_set="all"), "keep"),
    "vtw": (lambda: VTW(layer=1), "renumber"),
    "skip": (lambda: LayerSkip(layers=[1]), "keep"),
    "visipruner": (lambda: VisiPruner(shallow_mid_layer=1, layer_threshold=-2.0, deep_exit_cos=-2.0), "keep"),
}


def plain_layer_flops(nq: int, nk: int, d: int, h: int, hkv: int, dh: int, m: int) -> int:
    """2 x MACs: q, k, v, o projections, q.k^T and A.v, SwiGLU (dvlm_exp/reporting/flops.py `exact`)."""
    return 2 * (nq * d * h * dh + 2 * nq * d * hkv * dh + nq * h * dh * d + 2 * nq * nk * h * dh + 3 * nq * d * m)


# ----------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_prompt_rows_under_the_prefix_mask_are_the_official_prefill(backbone, models, seqs):
    """Official prefix_lm: the prompt runs alone (prefill). Under our prefix-LM mask the prompt rows
    of the full forward must equal that prompt-only forward, and the prompt's attention rows must be
    the prompt-only rows with zero mass on the answer columns."""
    m, seq = models[backbone], seqs[backbone]
    P = seq.prompt_embeds.shape[0]
    rows_q = torch.tensor([0, P // 2, P - 1])

    class Probe:
        def __init__(self):
            self.req = self.hidden = None

        def score_request(self, view):
            if view.layer == 1:
                self.req = ScoreRequest(query_index=rows_q, keep_rows=True)
                return self.req

        def after_forward(self, view, logits, rows):
            self.hidden = view.hidden[0].clone()  # final hidden states (before the norm)

    full_probe, alone_probe = Probe(), Probe()
    e = PrefixEngine(m, cache=False, probes=[full_probe])
    e.recorder.start_sample()
    e.forward(fresh(seq), 0, torch.arange(G))
    alone_seq = replace(seq, response_ids=seq.response_ids[:0].clone())
    ref = Engine(m, probes=[alone_probe])
    ref.recorder.start_sample()
    ref.forward(alone_seq, 0, torch.tensor([m.logit_shift - 1]))  # the last prompt row only
    assert alone_probe.hidden.shape[0] == P
    torch.testing.assert_close(full_probe.hidden[:P], alone_probe.hidden, rtol=1e-4, atol=1e-4)
    a, b = full_probe.req.rows, alone_probe.req.rows  # [3, P + G], [3, P]
    torch.testing.assert_close(a[:, :P], b, rtol=1e-4, atol=1e-6)
    assert float(a[:, P:].abs().max()) == 0.0


@pytest.mark.parametrize("backbone", ["llada", "dream"])
@pytest.mark.parametrize("prune", list(METHODS))
def test_cache_equals_the_prefix_mask_run(backbone, prune, models, seqs):
    """Cache on == no-cache prefix-mask run: logits allclose at every step, identical ids; with
    a method acting at step 0 the reference replays its decision at its layer (persist: replay).
    `fastv_all_rows` scores with every row (prompt rows answered under the mask); VTW drops the
    image before layer 1 (renumbered); `skip` lets the visual tokens bypass layer 1 (its cache
    holds the text tokens only).

    VisiPruner's shallow attention edits (prompt rows included, answered under the mask) are part of
    the step-0 forward, so the cache holds the edited prompt K/V; the no-cache reference replays
    decisions only, not edits, so after step 0 it is a different computation: only step 0 is
    compared there (the cache is then the AR-prefill reading of the edit)."""
    m, seq = models[backbone], seqs[backbone]
    mk, pos = METHODS[prune]
    ids_c, logs_c, rec_c = sample(m, seq, True, mk(), FirstStep(), pos)
    ids_m, logs_m, rec_m = sample(m, seq, "mask_only", mk(), FirstStep(persist="replay"), pos)
    assert len(logs_c) == len(logs_m) >= 2
    if prune == "visipruner":
        torch.testing.assert_close(logs_c[0], logs_m[0], rtol=1e-5, atol=1e-5)
        assert len(ids_c) == G and m.mask_id not in ids_c
        return
    for a, b in zip(logs_c, logs_m):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ids_c == ids_m and m.mask_id not in ids_c
    if prune.startswith("fastv"):
        nv = seq.n_visual()
        assert rec_c.kept_by_step_layer[(0, 0)] == nv and rec_c.kept_by_step_layer[(0, 1)] == round(0.5 * nv)
        assert rec_c.kept_by_step_layer[(1, 1)] == round(0.5 * nv)  # the cache of layer 1 holds the kept ones


@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_cached_layer_calls_and_flops_are_the_hand_count(backbone, models, seqs):
    """First forward: every layer (n, n) as it ran; later forwards: (G, cached prompt + G) per
    layer, the cache of layer >= K holding only the kept tokens. The baseline stays the unpruned
    uncached full forward, so the cache's saving shows in `reduction`."""
    from dvlm_exp.reporting import flops

    m, seq = models[backbone], seqs[backbone]
    P, nv = seq.prompt_embeds.shape[0], seq.n_visual()
    kept = round(0.5 * nv)
    P1 = P - nv + kept
    _, logs, rec = sample(m, seq, True, FastV(ratio=0.5, layer=1), FirstStep())
    F = len(logs)
    want = Counter({(P + G, P + G): 1, (P1 + G, P1 + G): 1, (G, P + G): F - 1, (G, P1 + G): F - 1})
    assert rec.layer_calls == want and rec.n_forwards == F
    assert rec.baseline_forwards == Counter({P + G: F})
    dims = m.dims()
    d, h, hkv, dh, mm = dims["d"], dims["heads"], dims["kv_heads"], dims["head_dim"], dims["m"]
    plain = sum(c * plain_layer_flops(nq, nk, d, h, hkv, dh, mm) for (nq, nk), c in want.items())
    got = flops.sample_flops(rec, dims)
    assert got["decoder"] == plain
    assert got["baseline_decoder"] == F * 2 * plain_layer_flops(P + G, P + G, d, h, hkv, dh, mm)
    # the same run without the cache costs more; both share the baseline
    _, _, rec_m = sample(m, seq, "mask_only", FastV(ratio=0.5, layer=1), FirstStep(persist="replay"))
    got_m = flops.sample_flops(rec_m, dims)
    assert got["decoder"] < got_m["decoder"] < got_m["baseline_decoder"] == got["baseline_decoder"]


def test_dream_slot0_reads_the_prefill_last_row(models, seqs):
    """Dream's shifted head: slot 0 is predicted by the last prompt row (official:
    `first_token = prefill.logits[:, -1:]`). Answer-only forwards do not run that row: its final
    hidden state is kept from the first forward, so slot 0's logits at a later step equal the
    prompt-only forward's last row."""
    m, seq = models["dream"], seqs["dream"]
    e = PrefixEngine(m, cache=True)
    e.recorder.start_sample()
    e.begin_sample(4)
    s = fresh(seq)
    e.forward(s, 0, torch.arange(G))
    s.response_ids[3] = 100  # the answer changes: slot 0's row must not
    later = e.forward(s, 1, torch.arange(G)).logits
    ref = Engine(m)
    ref.recorder.start_sample()
    alone = ref.forward(replace(seq, response_ids=seq.response_ids[:0].clone()), 0, torch.tensor([0])).logits
    torch.testing.assert_close(later[0], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_prefix_mask_is_an_approximation_of_full_attention(backbone, models, seqs):
    """Not exact: the default run (prefix_cache=false) lets prompt rows attend to the answer, so the
    answer logits differ from the prefix-mask ones (ids may differ too: not asserted). Only the
    shape of the result and a complete answer are common."""
    m, seq = models[backbone], seqs[backbone]
    ids_f, logs_f, _ = sample(m, seq, False)
    ids_c, logs_c, _ = sample(m, seq, True)
    if backbone == "dream":  # the prefill that commits slot 0 comes first (test below)
        logs_c = logs_c[1:]
    assert logs_f[0].shape == logs_c[0].shape
    assert float((logs_f[0] - logs_c[0]).abs().max()) > 1e-4
    assert len(ids_f) == len(ids_c) == G and m.mask_id not in ids_f + ids_c


def test_a_method_acting_after_the_prefill_is_refused(models, seqs):
    m, seq = models["llada"], seqs["llada"]
    with pytest.raises(RuntimeError, match="acts at step 2, after the prompt was cached"):
        sample(m, seq, True, FastV(ratio=0.5, layer=1), AtStep(step=2))
    with pytest.raises(RuntimeError, match="persist=none is not supported"):
        sample(m, seq, True, FastV(ratio=0.5, layer=1), FirstStep(persist="none"))


# ----------------------------------------------------------------------------- config and runs
def _cfg(ckpt, backbone, *extra):
    from dvlm_exp.run.build import compose_config

    return compose_config([f"model=lavida_{backbone}", f"model.path={ckpt}", "model.dtype=float32", "model.device=cpu",
                           "task=synth_docvqa", "limit=1", "task.synthetic.n=1", f"task.gen.gen_length={G}",
                           f"task.gen.block_length={G}", "task.gen.steps=4", "progress=false", *extra])


@pytest.mark.parametrize("extra,msg", [
    (["prune=fastv", "prune.layer=1", "schedule=at_step", "schedule.step=2"], "schedule=at_step acts later"),
    (["prune=fastv", "prune.layer=1", "schedule=every_step"], "schedule=every_step acts later"),
    (["prune=redvtp"], "prunes after a step"),
    (["prune=fastv", "prune.layer=1", "schedule.persist=none"], "persist=none is not supported"),
])
def test_config_refuses_late_methods_with_the_cache(extra, msg, ckpts):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    with pytest.raises(ConfigError, match=msg):
        check(_cfg(ckpts["llada"], "llada", "model.prefix_cache=true", *extra), data=False)
    check(_cfg(ckpts["llada"], "llada", "model.prefix_cache=mask_only", *extra), data=False)  # no cache: fine
    with pytest.raises(ConfigError, match="must be false, true or mask_only"):
        check(_cfg(ckpts["llada"], "llada", "model.prefix_cache=yes"), data=False)
    check(_cfg(ckpts["llada"], "llada", "model.prefix_cache=true", "prune=fastv", "prune.layer=1"), data=False)


def test_two_by_two_runs_record_prefix_cache(ckpts, tmp_path):
    """Pruning on/off x cache on/off through runner.run: each results.json records
    model.prefix_cache; the cache and the pruning each lower the decoder FLOPs, the baseline is
    the same unpruned uncached run in all four."""
    from dvlm_exp.run.runner import run

    recs = {}
    for cache in (False, True):
        for prune in ("none", "fastv"):
            d = tmp_path / f"{prune}_{cache}"
            extra = [f"model.prefix_cache={str(cache).lower()}", f"prune={prune}"]
            if prune == "fastv":
                extra += ["ratio=0.5", "prune.layer=1"]
            run(_cfg(ckpts["llada"], "llada", *extra), d)
            recs[(prune, cache)] = json.loads((d / "results.json").read_text())
    for (prune, cache), r in recs.items():
        assert r["config"]["model"]["prefix_cache"] is cache and r["config"]["prune"]["name"] == prune
    dec = {k: r["flops"]["by_convention"]["exact"] for k, r in recs.items()}
    key, base = "decoder", "baseline_decoder"
    assert len({dec[k][base] for k in dec}) == 1
    assert recs[("fastv", True)]["flops"]["reduction"] > recs[("none", True)]["flops"]["reduction"] > 0.0
    assert dec[("none", False)][key] == dec[("none", False)][base]
    assert dec[("fastv", True)][key] < dec[("none", True)][key] < dec[("none", False)][key]
    assert dec[("fastv", True)][key] < dec[("fastv", False)][key] < dec[("none", False)][key]


@pytest.mark.parametrize("prefix", [True, "mask_only"])
def test_dream_prefix_commits_slot0_from_the_prefill(models, seqs, prefix):
    """Official prefix_lm loop (LaViDa dream/generation_utils.py): a prefill over the prompt sets
    answer slot 0 to the argmax of the last prompt row, then `steps` forwards unmask the G - 1 other
    slots. Ours: the step-0 forward is that prefill (prompt rows never see the answer), its decisions
    are taken once, and the loop's counts start from G - 1 masked slots."""
    m, seq = models["dream"], seqs["dream"]
    ids, logs, rec = sample(m, seq, prefix)
    ref = Engine(m)
    ref.recorder.start_sample()
    alone = ref.forward(replace(seq, response_ids=seq.response_ids[:0].clone()), 0, torch.tensor([0])).logits
    assert ids[0] == int(alone[0].argmax())
    assert logs[0].shape[0] == 1 and len(logs) == PRESET.steps + 1
    assert m.mask_id not in ids
