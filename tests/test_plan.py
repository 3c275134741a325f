"""dvlm_exp.reporting.plan: FLOPs of a configuration from config.json alone.

(a) a plan equals, term by term, what the engine records in real tiny runs (both conventions,
    with and without pruning, several schedules, query sets and block layouts);
(b) on the LLaDA-V 8B config: dims, visual-token counts, and methods.md §5.5/§5.6;
(c) scripts/plan_flops.py: JSON last line for a folder holding only config.json, clear errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

from dvlm_exp.reporting import flops, plan

CONFIG_8B = REPO / "tests" / "data" / "llada_v_8b_config.json"
QUESTION = "What is the total?"


# ------------------------------------------------------------------------------ (a) tiny runs
@pytest.fixture(scope="module")
def tiny_dims(tiny_model):
    return tiny_model.dims()


@pytest.fixture(scope="module")
def prepared(tiny_model, doc_images):
    """n_text, n_visual and views of the real prepared sequence for the first page."""
    ids = tiny_model.prompt_ids(QUESTION, n_images=1)
    seq, info = tiny_model.prepare(ids, [doc_images[0]], gen_length=4)
    return {"n_text": info["prompt_len"] - info["n_visual"], "n_visual": info["n_visual"], "views": info["views"]}


def test_dims_from_tiny_config_match_loaded_model(tiny_cfg, tiny_dims):
    from omegaconf import OmegaConf

    from dvlm_exp.models.tiny import official_config, tower_config
    from dvlm_exp.run.build import model_path

    assert plan.dims_from_config(model_path(tiny_cfg)) == tiny_dims  # folder: tower + tokenizer files
    spec = OmegaConf.to_container(tiny_cfg.model.tiny)
    assert plan.dims_from_config(official_config(spec), tower=tower_config(spec)) == tiny_dims  # no checkpoint


def test_image_tokens_match_prepared_sequence(tiny_cfg, doc_images, prepared):
    from dvlm_exp.run.build import model_path

    got = plan.image_tokens(model_path(tiny_cfg), doc_images[0].size)
    assert (got["n_visual"], got["views"]) == (prepared["n_visual"], prepared["views"])


CASES = {
    # id: (method, schedule step or None for FirstStep or ("start_frac", frac), preset)
    "none": ("none", dict(), None, dict(gen_length=8, block_length=4, steps=4)),
    "fastv_last_k2": ("fastv", dict(ratio=0.3, layer=2, query_set="last_token"), None,
                      dict(gen_length=8, block_length=8, steps=4)),
    "fastv_masked_at_step3": ("fastv", dict(ratio=0.5, layer=1, query_set="masked_response"), 3,
                              dict(gen_length=8, block_length=4, steps=4)),
    "fastv_all_k3_short_blocks": ("fastv", dict(ratio=0.25, layer=3, query_set="all"), 1,
                                  dict(gen_length=4, block_length=2, steps=6)),  # 3 steps/block > 2 slots
    "random_k0": ("random", dict(ratio=0.4, layer=0), None, dict(gen_length=6, block_length=6, steps=3)),
    "redvtp_after_step0": ("redvtp", dict(ratio=0.35), None, dict(gen_length=8, block_length=4, steps=4)),
    # after_step acting later: the masked rows RedVTP scores at the acting step are fewer than
    # gen_length (4 of 8 at step 2; 6 of 12 at step 3, block 1; floor(0.55 * 4) = 2 -> 4 of 8)
    "redvtp_after_step2": ("redvtp", dict(ratio=0.35), 2, dict(gen_length=8, block_length=8, steps=4)),
    "redvtp_after_step3_three_blocks": ("redvtp", dict(ratio=0.35), 3, dict(gen_length=12, block_length=4, steps=6)),
    "redvtp_start_frac": ("redvtp", dict(ratio=0.5), ("start_frac", 0.55), dict(gen_length=8, block_length=8, steps=4)),
}


def _register_cpu_sdpa_flops():
    """torch's FlopCounterMode has no formula for the CPU flash-attention kernel; give it the one
    torch uses for the other SDPA kernels (public registration API; as tests/test_flops.py)."""
    import torch
    from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

    try:
        @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)
    except RuntimeError:  # already registered (tests/test_flops.py or a newer torch)
        pass


def naive_price(rec, dims: dict) -> dict:
    """Both FLOPs conventions of a SampleRecord written out by hand from dvlm_exp/reporting/flops.py's
    docstring, one matmul at a time (independent of flops.sample_flops)."""
    d, m, h, hkv, dh, V, T = (dims[k] for k in ("d", "m", "heads", "kv_heads", "head_dim", "vocab", "layers"))

    def exact_layer(nq, nk):
        q_proj = 2 * nq * d * (h * dh)
        k_proj = v_proj = 2 * nq * d * (hkv * dh)  # grouped KV heads
        o_proj = 2 * nq * (h * dh) * d
        qk = av = 2 * nq * nk * (h * dh)
        gate = up = down = 2 * nq * d * m  # SwiGLU
        return q_proj + k_proj + v_proj + o_proj + qk + av + gate + up + down

    def paper_layer(nq, nk):  # FastV paper: 4nd^2 + 2n^2d + 2ndm (MACs)
        return 4 * nq * d * d + 2 * nq * nk * d + 2 * nq * d * m

    n, vd, vm, p = dims["vision_patches"], dims["vision_d"], dims["vision_m"], dims["patch_size"]
    patch_conv = 2 * n * (3 * p * p) * vd
    siglip_layer = 4 * (2 * n * vd * vd) + 2 * (2 * n * n * vd) + 2 * (2 * n * vd * vm)  # qkvo, QK/AV, fc1/fc2
    projector = 2 * n * dims["mm_hidden"] * d + 2 * n * d * d
    vision = rec.vision_views * (patch_conv + dims["vision_layers"] * siglip_layer + projector)

    out = {}
    for conv, layer in (("exact", exact_layer), ("fastv_paper", paper_layer)):
        dec = sum(c * layer(nq, nk) for (nq, nk), c in rec.layer_calls.items())
        base = sum(c * T * layer(nf, nf) for nf, c in rec.baseline_forwards.items())
        out[conv] = dict(decoder=dec, baseline_decoder=base, total=dec, baseline_total=base)
    head, base_head = 2 * rec.lm_head_rows * d * V, 2 * rec.baseline_lm_head_rows * d * V
    out["exact"].update(lm_head=head, vision=vision, scoring=rec.scoring_flops,
                        total=out["exact"]["decoder"] + head + vision + rec.scoring_flops,
                        baseline_total=out["exact"]["baseline_decoder"] + base_head + vision)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_plan_equals_engine_record(tiny_model, tiny_dims, doc_images, prepared, case):
    """The plan equals, term by term, what the engine records in a real run; its FLOPs equal a
    hand-written pricing of that record and what torch's FlopCounterMode counts around the run.
    Catches a plan that prices the wrong masked rows (e.g. gen_length for an after_step method
    acting after step 0) and a bug in flops.sample_flops (which prices both plan and engine)."""
    import math
    from fractions import Fraction

    from torch.utils.flop_counter import FlopCounterMode

    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.registry import PRUNERS
    from dvlm_exp.schedules.at_step import AtStep
    from dvlm_exp.schedules.first_step import FirstStep
    from dvlm_exp.schedules.start_frac import StartFrac

    method, kw, at, gen = CASES[case]
    pruner = PRUNERS.get(method)(**kw)
    if at is None:
        schedule, step = FirstStep(), 0
    elif isinstance(at, tuple):  # start_frac: floor(frac * steps), by exact arithmetic
        schedule, step = StartFrac(frac=at[1]), math.floor(Fraction(str(at[1])) * gen["steps"])
    else:
        schedule, step = AtStep(at), at
    preset = GenPreset(**gen, stop=[], honor_until=False)  # nothing stops early: NFE = steps
    g = Generator(tiny_model, pruner, schedule, preset)
    _register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as fc:
        g.generate(QUESTION, [doc_images[0]])
    counted = fc.get_total_flops()
    rec = g.recorder.current

    rec_plan = plan.plan_record(tiny_dims, prepared["n_visual"], prepared["n_text"], gen["gen_length"],
                                gen["block_length"], gen["steps"], kw.get("ratio", 1.0), kw.get("layer", 0),
                                step=step, views=prepared["views"], method=method,
                                query_set=kw.get("query_set", "last_token"),
                                position="after_step" if method == "redvtp" else "in_forward")
    assert rec_plan.n_forwards == rec.n_forwards
    assert rec_plan.layer_calls == rec.layer_calls
    assert rec_plan.baseline_forwards == rec.baseline_forwards
    assert rec_plan.kept_by_step_layer == rec.kept_by_step_layer
    assert (rec_plan.lm_head_rows, rec_plan.scoring_flops, rec_plan.vision_views) == \
           (rec.lm_head_rows, rec.scoring_flops, rec.vision_views)
    if method == "redvtp" and step > 0:  # the case is what it claims: fewer masked rows than gen_length
        assert 0 < rec.scoring_flops < tiny_dims["layers"] * flops.score_rows_flops(
            gen["gen_length"], rec_plan.baseline_forwards.most_common(1)[0][0], tiny_dims)

    out = plan.plan(tiny_dims, prepared["n_visual"], prepared["n_text"], gen["gen_length"], gen["block_length"],
                    gen["steps"], kw.get("ratio", 1.0), kw.get("layer", 0), step=step, views=prepared["views"],
                    method=method, query_set=kw.get("query_set", "last_token"),
                    position="after_step" if method == "redvtp" else "in_forward")
    ref = naive_price(rec, tiny_dims)  # independent of flops.sample_flops
    for conv in flops.CONVENTIONS:
        assert {k: out[conv][k] for k in ref[conv]} == ref[conv], conv
        engine = flops.sample_flops(rec, tiny_dims, conv)
        assert {k: out[conv][k] for k in engine} == engine, conv
    # every matmul that ran, counted by torch (decoder, LM head, tower, projector, scoring rows)
    assert out["exact"]["total"] == ref["exact"]["total"] == counted
    if method == "none":
        assert out["exact"]["total"] == out["exact"]["baseline_total"]
    else:
        assert out["exact"]["total"] < out["exact"]["baseline_total"]
        assert out["fastv_paper"]["reduction"] > 0


# ------------------------------------------------------------------------------ (b) 8B config
@pytest.fixture(scope="module")
def dims_8b():
    return plan.dims_from_config(CONFIG_8B)


def test_8b_dims(dims_8b):
    assert dims_8b == dict(d=4096, m=12288, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=126349,
                           vision_d=1152, vision_m=4304, vision_layers=26, vision_patches=729, patch_size=14,
                           mm_hidden=1152)
    assert plan.dims_from_config(CONFIG_8B, resize_vocab=False)["vocab"] == 126464


@pytest.mark.parametrize("wh,n,views", [((1000, 1000), 3699, 10), ((1700, 2200), 3657, 31), ((384, 384), 1485, 2),
                                        ((800, 600), 3627, 7), ((1000, 3000), 3705, 13)])
def test_8b_visual_tokens(wh, n, views):
    """models.md §1.6 worked counts."""
    got = plan.image_tokens(CONFIG_8B, wh)
    assert (got["n_visual"], got["views"]) == (n, views)


DOCVQA = dict(n_visual=3699, n_text=80, gen_length=32, block_length=32, steps=16)


def paper_ratio(dims, **kw):
    return plan.plan(dims, **{**DOCVQA, **kw})["fastv_paper"]["ratio"]


@pytest.mark.parametrize("kw,expected", [
    (dict(layer=2, keep_ratio=0.5), 0.478), (dict(layer=2, keep_ratio=0.25), 0.244),
    (dict(layer=16, keep_ratio=0.5), 0.492), (dict(layer=16, keep_ratio=0.25), 0.265),
    (dict(layer=2, keep_ratio=0.5, position="after_step"), 0.508),
    (dict(layer=2, keep_ratio=0.25, position="after_step"), 0.289),
    (dict(layer=2, keep_ratio=0.5, step=4), 0.609), (dict(layer=2, keep_ratio=0.25, step=8), 0.624),
    (dict(layer=2, keep_ratio=0.5, step=12), 0.871),
])
def test_8b_matches_methods_5_6(dims_8b, kw, expected):
    """methods.md §5.6 (LLaDA-V DocVQA-like). Its figures are a full forward over all tokens per
    step with no LM head: exactly the fastv_paper convention of an engine run (no cache)."""
    assert abs(paper_ratio(dims_8b, **kw) - expected) <= 0.002


def test_8b_shape_of_the_tradeoff(dims_8b):
    """§5.5: the keep ratio sets the compute; at first-step pruning K barely matters."""
    ratios = [1.0, 0.75, 0.5, 0.35, 0.25]
    for conv in flops.CONVENTIONS:
        for K in (2, 8, 16, 20, 24):
            red = [plan.plan(dims_8b, **DOCVQA, keep_ratio=r, layer=K)[conv]["reduction"] for r in ratios]
            assert all(a < b for a, b in zip(red, red[1:])), (conv, K, red)
        by_k = [plan.plan(dims_8b, **DOCVQA, keep_ratio=0.35, layer=K)[conv]["ratio"] for K in (2, 8, 16, 20, 24)]
        assert all(a < b for a, b in zip(by_k, by_k[1:]))  # later K costs a little more
        assert by_k[-1] - by_k[0] < 0.05  # ... but far less than one keep-ratio notch
    base = plan.plan(dims_8b, **DOCVQA, method="none")
    assert base["nfe"] == 16
    assert abs(base["fastv_paper"]["baseline_total"] / 16 / 24.3e12 - 1) < 0.01  # ≈ 24.3 TMAC per step
    assert abs(base["exact"]["baseline_decoder"] / 16 / 61e12 - 1) < 0.01  # ≈ 61 TFLOP per step
    assert base["exact"]["vision"] == flops.vision_flops(0, dims_8b)  # views=0: tower left out


# ------------------------------------------------------------------------------ (c) the CLI
def run_plan(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "scripts/plan_flops.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def plan_cli():
    """scripts/plan_flops.py's module (its `main(argv)` is what `python scripts/plan_flops.py` runs)."""
    from dvlm_exp.reporting import plan_cli

    return plan_cli


def test_cli_8b_config_only(tmp_path, plan_cli, capsys):
    shutil.copy(CONFIG_8B, tmp_path / "config.json")  # no weights, no tokenizer
    rc = plan_cli.main(["model=llada_v", f"model.path={tmp_path}", "task=synth_docvqa", "prune=fastv", "--ratios", "1,0.5,0.25",
                        "--layers", "2,16", "--image", "1000x1000"])
    stdout = capsys.readouterr().out
    assert rc == 0
    out = json.loads(stdout.strip().splitlines()[-1])
    assert (out["n_visual"], out["views"], out["n_text"], out["nfe"]) == (3699, 10, 80, 16)
    assert [(r["ratio"], r["layer"]) for r in out["rows"]] == [(1.0, 2), (1.0, 16), (0.5, 2), (0.5, 16), (0.25, 2), (0.25, 16)]
    got = {(r["ratio"], r["layer"]): r["fastv_paper_ratio"] for r in out["rows"]}
    for key, want in {(0.5, 2): 0.478, (0.25, 2): 0.244, (0.5, 16): 0.492, (0.25, 16): 0.265}.items():
        assert abs(got[key] - want) <= 0.002
    assert "exact TFLOPs" in stdout


def test_cli_process_exit_codes(tmp_path):
    """As a process: a missing config.json fails before anything heavy loads, with one error line."""
    p = run_plan("model=llada_v", f"model.path={tmp_path}", "prune=fastv", "prune.layer=20", "ratio=0.35")
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("error: ") and "config.json is missing" in p.stderr
    assert p.stdout == ""


def test_cli_errors(plan_cli, capsys):
    rc = plan_cli.main(["model=llada_v", f"model.path={CONFIG_8B.parent}", "--n-text", "5"])
    assert rc == 2 and "config.json is missing" in capsys.readouterr().err  # tests/data has no config.json
    rc = plan_cli.main(["model=llada_v"])
    assert rc == 2 and "model.path" in capsys.readouterr().err
    rc = plan_cli.main(["model=tiny", "prune=fastv", "ratio=1.5"])
    assert rc == 2 and "ratio=1.5" in capsys.readouterr().err
    rc = plan_cli.main(["model=tiny", "prune=fastv", "--layers", "0,2"])  # FastV scores at K-1
    assert rc == 2 and "prune.layer=0" in capsys.readouterr().err


def test_cli_tiny_without_writing_checkpoint(monkeypatch, capsys, plan_cli, tiny_dims):
    import dvlm_exp.models.tiny as tiny

    def no_write(*a, **k):
        raise AssertionError("plan_flops must not write a checkpoint")

    monkeypatch.setattr(tiny, "write_checkpoint", no_write)
    monkeypatch.setattr(tiny, "ensure_checkpoint", no_write)
    rc = plan_cli.main(["model=tiny", "prune=fastv", "--ratios", "0.5,0.25", "--layers", "1,3", "--image", "640x480"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    res = json.loads(out[-1])
    assert res["dims"] == tiny_dims and res["n_visual"] == 2929 and len(res["rows"]) == 4


def test_cli_question_counts_text_with_tokenizer(tiny_cfg, tiny_model, plan_cli, capsys):
    """--question: text tokens of the real prompt (checkpoint tokenizer, the task's think suffix)."""
    from dvlm_exp.run.build import model_path

    rc = plan_cli.main(["model=llada_v", f"model.path={model_path(tiny_cfg)}", "task=synth_docvqa", "prune=fastv", "prune.layer=2",
                        "--question", QUESTION, "--image", "512x384"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = tiny_model.prompt_ids(QUESTION, n_images=1, think=tiny_cfg.task.gen.think)
    assert (res["n_text"], res["n_text_source"]) == (len(ids) - 1, "tokenizer")
    assert res["dims"] == tiny_model.dims()
