"""VisiPruner's own LLaVA-1.5 code (EIT-NLP/VisiPruner) vs the llava15_visipruner preset on tiny LLaVA-1.5.

Re-stated here from llava/model/language_model/custom_modeling_llama.py (read, not copied), the AR
prefill of LlamaModel.forward + LlamaAttention.forward + LlamaAttention.value_aware_token_selection:
  - shallow (layers < shallow_mid_layer, prefill only): after the causal softmax, layer 0 of the 7B
    model zeroes every row from the image on (`attn_weights[:, :, 35:, 35:vis_end] = 0`) and puts the
    text rows' removed mass on the first image column (`[:, :, vis_end:, 35] = sum`); layers
    1..mid-1 zero the text rows after the image (`[:, :, vis_end:, 35:vis_end] = 0`); no renormalising;
  - middle (layers > shallow_mid_layer, until it fires): the last query row's attention output o
    (heads concatenated, before o_proj) and per-token contributions c_i = concat_h a_{-1,i} v_i; the
    first layer with any cos(o - c_i, o) < layer_threshold keeps the image tokens with
    ||c_i|| > tokens_threshold (`torch.where`, index order) from the next layer on, positions kept;
  - deep: every later layer on the pruned sequence adds `not any(cos < 0.999)` to exit_indicator
    (cumulative); when it is 2 before a layer, every image token is dropped.
The image span is the actual one here (the code hard-codes 35 : 35 + 576 for LLaVA-1.5's template).
Layers are run by hand (causal softmax per head, explicit probabilities), independent of our engine.
The tiny model has 6 layers so that every stage acts; thresholds are picked on the reference's own
values so that each stage fires (tokens_threshold at a gap of the fusion layer's norms).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from test_llava_ar import _image, _ref_inputs, _run
from dvlm_exp.models.llava_hf import LlavaHF
from dvlm_exp.models.tiny_llava import write_checkpoint
from dvlm_exp.pruning.visipruner import VisiPruner

N_LAYERS = 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = write_checkpoint(tmp_path_factory.mktemp("llava6") / "llava", "llava", spec={"num_hidden_layers": N_LAYERS},
                            seed=2)
    ref = LlavaForConditionalGeneration.from_pretrained(str(path), attn_implementation="eager").eval()
    return LlavaHF.from_pretrained(path), ref, AutoProcessor.from_pretrained(str(path))


@pytest.fixture(scope="module")
def preset():
    """prune.* of the llava15_visipruner sweep's jobs, as they compose."""
    from dvlm_exp.run import sweep_jobs as sj
    cfg = sj.compose(["+sweep=llava15_visipruner", "task=llava_gqa"])
    p = {k: v for k, v in cfg.prune.items() if k != "name"}
    return p


def code_prefill(ref, x, mid, layer_thr, tok_thr, deep_cos=0.999, norms_out=None):
    """custom_modeling_llama.py's prefill decisions: (kept image indices, fusion layer, exit layer)."""
    lm = ref.model.language_model
    ids = x["input_ids"][0]
    with torch.no_grad():
        emb = lm.embed_tokens(x["input_ids"])
        feats = torch.cat(list(ref.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output))
        h = emb.masked_scatter((x["input_ids"] == ref.config.image_token_id)[..., None], feats)
        vis = torch.nonzero(ids == ref.config.image_token_id).squeeze(1)
        start, end, n0 = int(vis[0]), int(vis[-1]) + 1, ids.numel()
        idx = torch.arange(n0)  # original index of each current position
        important, exit_ind, fusion, exit_layer, dropped = None, 0, None, None, False
        for li, layer in enumerate(lm.layers):
            if li > mid and important is not None and idx.numel() == n0:  # middle survivors from here on
                idx = torch.cat([idx[:start], important, idx[end:]])
                h = h[:, torch.cat([torch.arange(start), important, torch.arange(end, n0)])]
            elif li > mid and important is not None and exit_ind == 2 and not dropped:
                keep = (idx < start) | (idx >= end)
                idx, h, dropped = idx[keep], h[:, keep], True
                exit_layer = li
            attn = layer.self_attn
            xx = layer.input_layernorm(h)
            n, hd = xx.shape[1], attn.head_dim
            q = attn.q_proj(xx).view(1, n, -1, hd).transpose(1, 2)
            k = attn.k_proj(xx).view(1, n, -1, hd).transpose(1, 2)
            v = attn.v_proj(xx).view(1, n, -1, hd).transpose(1, 2)
            cos, sin = lm.rotary_emb(xx, idx[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            s = (q @ k.transpose(-1, -2)) / hd ** 0.5
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            p = torch.softmax(s.float(), dim=-1)[0]  # [H, n, n]
            if li < mid and idx.numel() == n0:  # shallow, prefill (full sequence)
                if li == 0:
                    removed = p[:, end:, start:end].sum(-1)
                    p[:, start:, start:end] = 0.0
                    p[:, end:, start] = removed
                else:
                    p[:, end:, start:end] = 0.0
            o = (p @ v[0]).transpose(0, 1).reshape(n, -1)  # heads concatenated
            if li > mid and not dropped:
                cur_vis = torch.nonzero((idx >= start) & (idx < end)).squeeze(1)
                c = (p[:, -1, cur_vis][:, :, None] * v[0][:, cur_vis]).transpose(0, 1).reshape(cur_vis.numel(), -1)
                cs = F.cosine_similarity(o[-1][None] - c, o[-1][None].expand_as(c), dim=-1)
                if important is None:
                    if bool((cs < layer_thr).any()):
                        norms = (c).norm(dim=-1)
                        if norms_out is not None:
                            norms_out.append(norms)
                        important = idx[cur_vis][norms > tok_thr]
                        fusion = li
                else:
                    exit_ind += int(not bool((cs < deep_cos).any()))
            h = h + attn.o_proj(o[None])
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return important, fusion, exit_layer


class SpyVisiPruner(VisiPruner):
    """VisiPruner that remembers the original indices of the middle stage's survivors."""

    def decide(self, view):
        before = self.fusion_layer
        d = super().decide(view)
        if before is None and self.fusion_layer is not None:
            vis = view.visual_index if d is None else view.visual_index[d.keep]
            self.kept = view.positions[vis].clone()
        return d


def test_preset_is_the_codes_7b_definition(preset):
    """The options the code fixes for LLaVA-1.5-7B (custom_modeling_llama.py; the repo log's settings)."""
    assert preset["stages"] == ["shallow", "middle", "deep"] and preset["shallow_mid_layer"] == 6
    assert preset["layer_threshold"] == 0.997 and preset["tokens_threshold"] == 0.2
    assert preset["deep_exit_cos"] == 0.999 and preset["deep_exit_patience"] == 2 and not preset["deep_consecutive"]
    assert preset["shallow_layer0"] == "sink" and preset["shallow_rows"] == "after_image"
    assert preset["query_set"] in ("last_prompt_token", "last_token") and preset["position_ids"] == "keep"


@pytest.mark.parametrize("seed", [0, 1])
def test_preset_equals_visipruner_code(pair, preset, seed):
    ours_m, ref, proc = pair
    img = _image(seed)
    x = _ref_inputs(proc, img)
    mid = 1  # tiny: shallow = layer 0 (the 7B sink variant), middle from layer 2
    norms: list = []
    code_prefill(ref, x, mid, 1.5, 0.0, deep_cos=-2.0, norms_out=norms)  # fusion at layer 2: its norms
    srt = norms[0].sort().values
    gap = int(torch.argmax(srt[1:] - srt[:-1][: srt.numel() - 1]))  # largest gap
    gap = max(1, min(gap, srt.numel() - 2)) if srt.numel() > 2 else 0
    tok_thr = float((srt[gap] + srt[gap + 1]) / 2)
    want_kept, fusion, exit_layer = code_prefill(ref, x, mid, 1.5, tok_thr, deep_cos=-2.0)
    assert fusion == 2 and exit_layer == 5 and 0 < want_kept.numel() < norms[0].numel()
    opts = {**preset, "shallow_mid_layer": mid, "layer_threshold": 1.5, "tokens_threshold": tok_thr,
            "deep_exit_cos": -2.0}
    spy = SpyVisiPruner(**opts)
    _run(ours_m, spy, img, max_new=2, position_ids=opts["position_ids"])
    assert spy.fusion_layer == fusion and spy.exit_layer == exit_layer
    assert torch.equal(spy.kept, want_kept), (spy.kept.tolist(), want_kept.tolist())
