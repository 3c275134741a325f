"""Analytic FLOPs (exact convention) against torch.utils.flop_counter on the tiny model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from dvlm_exp.reporting import flops
from dvlm_exp.decoding.generator import GenPreset, Generator
from dvlm_exp.pruning.fastv import FastV
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.schedules.first_step import FirstStep

# torch counts SDPA on CUDA kernels but has no formula for the CPU flash kernel; give it the
# same formula torch uses for the others (public registration API, test process only).
_cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
try:
    @register_flop_formula(_cpu_sdpa)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)
except RuntimeError:  # already registered by a newer torch
    pass


def counted_and_analytic(model, method, image, **preset):
    gen = Generator(model, method, FirstStep(), GenPreset(**preset))
    with FlopCounterMode(display=False) as fc:
        gen.generate("What is the total?", [image])
    rec = gen.recorder.current
    return fc.get_total_flops(), flops.sample_flops(rec, model.dims(), "exact"), rec


@pytest.mark.parametrize("method", [NoPruning(), FastV(ratio=0.3, layer=2, query_set="last_token"),
                                    FastV(ratio=0.5, layer=1, query_set="masked_response")],
                         ids=["none", "fastv_last", "fastv_masked"])
def test_exact_convention_matches_flop_counter(tiny_model, doc_images, method):
    counted, ours, rec = counted_and_analytic(tiny_model, method, doc_images[0], gen_length=8, block_length=8, steps=4)
    assert abs(ours["total"] - counted) / counted < 0.01, (ours, counted)
    if method.active:
        assert ours["total"] < ours["baseline_total"]
        assert ours["scoring"] > 0
    else:
        assert ours["total"] == ours["baseline_total"]


def test_baseline_equals_unpruned_run(tiny_model, doc_images):
    """The baseline a pruned run reports is what the unpruned run actually costs."""
    preset = dict(gen_length=8, block_length=8, steps=4)
    _, pruned, rec_p = counted_and_analytic(tiny_model, FastV(ratio=0.25, layer=2), doc_images[1], **preset)
    counted_u, unpruned, rec_u = counted_and_analytic(tiny_model, NoPruning(), doc_images[1], **preset)
    if rec_p.n_forwards == rec_u.n_forwards:
        assert pruned["baseline_total"] == unpruned["total"]
    assert abs(pruned["baseline_total"] - counted_u) / counted_u < 0.01


def test_fastv_paper_sanity_check_llava_7b():
    """FastV README: LLaVA-1.5-7B, 576 image tokens, K=3, R=50% -> FLOPs ~57% (paper convention)."""
    dims = dict(d=4096, m=11008, layers=32)
    n = 576 + 55
    n_hat = n - round(0.5 * 576)
    f = lambda x: flops.layer_flops(x, x, dims, "fastv_paper")  # noqa: E731
    ratio = (3 * f(n) + 29 * f(n_hat)) / (32 * f(n))
    assert abs(ratio - 0.579) < 0.002


def test_summary_fields(tiny_model, doc_images):
    _, _, rec = counted_and_analytic(tiny_model, FastV(ratio=0.5, layer=2), doc_images[0], gen_length=8, block_length=8, steps=2)
    s = flops.summarize([rec], tiny_model.dims())
    assert set(s) >= {"total", "baseline_total", "reduction", "convention", "by_convention"}
    assert 0 < s["reduction"] < 1
    paper = s["by_convention"]["fastv_paper"]
    assert 0 < paper["reduction"] < 1 and paper["total"] < s["total"]
