"""FastV's own LLaVA code (pkunlp-icler/FastV) vs our prune=fastv on the tiny LLaVA-1.5 AR baseline.

The README's lmms-eval table was made with src/FastV/lmms-eval-with-kvcache/fastv_kvcache.py,
FastVLlamaModel.forward. Its pruning, re-stated here (naive reference, independent of our engine):
  - layer K-1 is run once more with output_attentions=True (eager attention: per-head softmax
    probabilities); its attentions are averaged over heads (`.mean(dim=1)`), and the LAST query row
    (`[0][-1]`) gives each image token's score;
  - kept = `topk(int(576 * ratio))` (int: floor) over the image span (hard-coded 35:611 for LLaVA-1.5-7B's
    template; the actual span here), prefix and suffix kept, indices SORTED (original order);
  - layers >= K see the kept sequence with `position_ids = keep_indexs` (original positions);
  - only when seq_length > 1 (the prefill); decoding attends to the pruned KV cache.
(The code calls layer K-1 twice with the cache on, so that layer's cache holds every key twice; a softmax
over a key set with every key duplicated equals the softmax over the set, so the outputs are those of a
cache holding each key once: the naive no-cache recomputation below.)

The reference takes the attention probabilities from transformers' own eager LLaVA forward
(output_attentions) on the same checkpoint and the generation from a step-by-step recomputation with
transformers' decoder layers. Ours: the fastv_readme sweep's prune config (K=3, last_token, rounding floor,
original positions). rounding=floor matters where N * ratio is not an integer (ratio 0.3 below); for
LLaVA-1.5's 576 tokens at the README's R = 25 / 50 / 75 % floor and round agree.
"""

from __future__ import annotations


import pytest
import torch

from test_llava_ar import SpyFastV, _image, _naive_pruned_generate, _ref_inputs, _run, ckpts, ours  # noqa: F401


@pytest.fixture(scope="module")
def eager_ref(ckpts):  # noqa: F811
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(ckpts["llava"]), attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(str(ckpts["llava"]))


@pytest.fixture(scope="module")
def readme_prune():
    """prune.* of the fastv_readme sweep's jobs, as they compose."""
    from dvlm_exp.run import sweep_jobs as sj
    cfg = sj.compose(["+sweep=fastv_readme", "task=llava_gqa"])
    return {k: cfg.prune[k] for k in ("layer", "query_set", "rounding", "position_ids")}


def fastv_code_keep(model, x, K: int, ratio: float) -> torch.Tensor:
    """fastv_kvcache.py FastVLlamaModel.forward's keep_indexs (whole prompt), re-stated."""
    with torch.no_grad():
        att = model(**x, output_attentions=True).attentions[K - 1]  # [1, heads, n, n], per-head softmax
    ids = x["input_ids"][0]
    vis = torch.nonzero(ids == model.config.image_token_id).squeeze(1)
    start, n_img, n = int(vis[0]), vis.numel(), ids.numel()
    assert torch.equal(vis, torch.arange(start, start + n_img))  # one contiguous span, as 35:611
    score = att.mean(dim=1)[0][-1][start:start + n_img]
    top = score.topk(int(n_img * ratio)).indices + start
    keep = torch.cat((torch.arange(start), top, torch.arange(start + n_img, n)))
    return keep.sort().values


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.3])
@pytest.mark.parametrize("seed", [0, 3])
def test_fastv_readme_preset_equals_fastv_code(ratio, seed, ours, eager_ref, readme_prune):  # noqa: F811
    model, proc = eager_ref
    img = _image(seed)
    x = _ref_inputs(proc, img)
    K = int(readme_prune["layer"])
    assert K == 3 and readme_prune["position_ids"] == "keep"
    spy = SpyFastV(ratio=ratio, **readme_prune)
    out, rec, seq, info = _run(ours["llava"], spy, img, max_new=6, position_ids=readme_prune["position_ids"])
    keep = fastv_code_keep(model, x, K, ratio)
    vis_mask = x["input_ids"][0] == model.config.image_token_id
    want_vis = keep[vis_mask[keep]]
    assert torch.equal(spy.kept, want_vis), (spy.kept.tolist(), want_vis.tolist())
    assert rec.kept_by_step_layer[(0, K)] == want_vis.numel() == int(info["n_visual"] * ratio)
    # generation on the pruned sequence, original positions: the code's output ids
    assert out == _naive_pruned_generate(model, x, keep, K, len(out))
