"""Analysis probes, aggregation, overlay and scripts/analyze.py on the tiny model.

The attention fractions are checked against a naive reference that runs the decoder layers by
hand for every denoising step (the answer ids of each step taken from the run) and builds
every layer's full attention matrix with an explicit per-head softmax; for FastV the naive
side also re-selects the kept visual tokens itself and slices the later steps' prompt.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dvlm_exp import analysis as an
from dvlm_exp.engine import Roles
from dvlm_exp.pruning.base import keep_count

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the total?"
G, STEPS, K, RATIO = 6, 3, 2, 0.3


class Spy:
    """A probe that remembers the answer ids each forward ran with."""

    def __init__(self):
        self.ids = []

    def score_request(self, view):
        return None

    def after_forward(self, view, logits, rows):
        self.ids.append(view.seq.response_ids.clone())


def _run(model, image, pruner):
    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.schedules.first_step import FirstStep

    session = an.AnalysisSession(model)
    spy = Spy()
    gen = Generator(model, pruner, FirstStep(), GenPreset(gen_length=G, block_length=G, steps=STEPS),
                    probes=session.probes + [spy])
    session.begin_sample(7, QUESTION, [image])
    text = gen.generate(QUESTION, [image], sample_id=7)
    session.end_sample(text, gen.recorder.current)
    return session.to_json(n_layers=len(model.layers)), spy.ids, gen.recorder.current


@pytest.fixture(scope="module")
def runs(tiny_model, doc_images):
    from dvlm_exp.pruning.fastv import FastV
    from dvlm_exp.pruning.none import NoPruning

    return {"none": _run(tiny_model, doc_images[0], NoPruning()),
            "fastv": _run(tiny_model, doc_images[0], FastV(ratio=RATIO, layer=K, query_set="masked_response"))}


def naive_layer(layer, h, cos, sin, roles, is_mask):
    """Full attention of one layer by hand: per-head softmax(q k^T / sqrt(d)) [h, n, n]; returns
    the per-group fractions of the answer rows, VisiPruner statistics, the matrices and the layer output."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    n, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1)[0], v.repeat_interleave(rep, dim=1)[0]
    probs = torch.softmax(q[0] @ k.transpose(1, 2) / hd ** 0.5, dim=-1)  # [h, n, n]: every head, every query
    resp = torch.nonzero(roles == Roles.RESPONSE).squeeze(1)
    A = probs[:, resp].mean(0)  # head-mean answer rows [G, n]
    per_row = torch.stack([A[:, roles == t].sum(1) for t in (Roles.VISUAL, Roles.TEXT, Roles.RESPONSE)], 1)
    fr = {}
    for g, sel in (("answer", torch.ones_like(is_mask)), ("masked", is_mask), ("unmasked", ~is_mask)):
        if sel.any():
            fr[g] = per_row[sel].mean(0)
    vis = torch.nonzero(roles == Roles.VISUAL).squeeze(1)
    qsel = is_mask if is_mask.any() else torch.ones_like(is_mask)
    a = probs[:, resp[qsel]].mean(1)  # [h, n]
    o = torch.cat([a[i] @ v[i] for i in range(a.shape[0])])  # concat over heads
    c = torch.cat([a[i, vis, None] * v[i, vis] for i in range(a.shape[0])], dim=1)  # [nv, h*dh]
    cs = torch.nn.functional.cosine_similarity(o[None] - c, o[None].expand_as(c), dim=-1)
    stats = {"min_cos": float(cs.min()), "mean_norm": float(c.norm(dim=-1).mean()),
             "visual_share": float(c.sum(0).norm() / o.norm())}
    return fr, stats, probs, layer(h, attention_mask=None, position_embeddings=(cos, sin))


def naive_run(model, image, ids_per_step, fastv: bool):
    """Per (step, layer) the naive fractions / statistics; the kept visual indices per (step, layer);
    the mean top-1 probability of the answer rows per step."""
    prompt = model.prompt_ids(QUESTION, n_images=1, think=None)
    seq, _ = model.prepare(prompt, [image], G)
    P = seq.prompt_embeds.shape[0]
    vis0 = torch.nonzero(seq.roles == Roles.VISUAL).squeeze(1)
    keep_vis = torch.arange(vis0.numel())  # indices into the visual tokens
    fracs, stats, kept, conf = {}, {}, {}, {}
    with torch.no_grad():
        for step, ids in enumerate(ids_per_step):
            prompt_keep = torch.cat([torch.nonzero(seq.roles != Roles.VISUAL).squeeze(1), vis0[keep_vis]]).sort().values
            idx = torch.cat([prompt_keep, P + torch.arange(G)])  # original positions
            roles = torch.cat([seq.roles[prompt_keep], torch.full((G,), Roles.RESPONSE, dtype=seq.roles.dtype)])
            h = torch.cat([seq.prompt_embeds[prompt_keep], model.embed_tokens(ids)])[None]
            cos, sin = model.rotary_emb(h, idx[None])
            is_mask = ids == seq.mask_id
            for li, layer in enumerate(model.layers):
                if fastv and step == 0 and li == K:  # FastV: rank by the layer K-1 attention, gather
                    n_vis = int((roles == Roles.VISUAL).sum())
                    queries = torch.nonzero(roles == Roles.RESPONSE).squeeze(1)[is_mask]
                    score = probs_prev[:, queries].mean(0).mean(0)[roles == Roles.VISUAL]  # head-mean, query-mean
                    keep_vis = torch.topk(score, keep_count(n_vis, RATIO)).indices.sort().values
                    sel = torch.cat([torch.nonzero(roles != Roles.VISUAL).squeeze(1),
                                     torch.nonzero(roles == Roles.VISUAL).squeeze(1)[keep_vis]]).sort().values
                    h, cos, sin, roles = h[:, sel], cos[:, sel], sin[:, sel], roles[sel]
                kept[(step, li)] = keep_vis.tolist() if (step > 0 or li >= K or not fastv) else list(range(vis0.numel()))
                fracs[(step, li)], stats[(step, li)], probs_prev, h = naive_layer(layer, h, cos, sin, roles, is_mask)
            logits = model.lm_head(model.norm(h[:, -G:]))[0].double()
            conf[step] = float(torch.softmax(logits, -1).amax(-1).mean())
    return fracs, stats, kept, conf


@pytest.mark.parametrize("method", ["none", "fastv"])
def test_fractions_sum_to_one_every_step_and_layer(runs, method):
    data, ids, rec = runs[method]
    L = data["n_layers"]
    rows = data["aggregate"]["attention"]
    seen = {(r["step"], r["layer"]) for r in rows if r["query"] == "answer"}
    assert seen == {(s, li) for s in range(len(ids)) for li in range(L)}
    for r in rows:
        assert r["visual"] + r["text"] + r["answer"] == pytest.approx(1.0, abs=1e-5), r
        assert all(0.0 <= r[k] <= 1.0 + 1e-6 for k in an.KEY_TYPES)
    for step, layer, g, n, *f in data["samples"][0]["attention"]:
        assert sum(f) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", ["none", "fastv"])
def test_fractions_equal_naive_full_attention(tiny_model, doc_images, runs, method):
    data, ids, rec = runs[method]
    fracs, stats, kept, conf = naive_run(tiny_model, doc_images[0], ids, fastv=method == "fastv")
    sample = data["samples"][0]
    got = {(s, li, an.QUERY_GROUPS[g]): f for s, li, g, n, *f in sample["attention"]}
    assert len(got) == sum(len(v) for v in fracs.values())
    for (s, li), groups in fracs.items():
        for g, ref in groups.items():
            np.testing.assert_allclose(got[(s, li, g)], ref.tolist(), atol=2e-5, rtol=0, err_msg=f"{method} {s} {li} {g}")
    # VisiPruner statistics from the same explicit matrices (masked answer queries)
    con = {(r[0], r[1]): dict(zip(an.CONTRIB_FIELDS, r[2:])) for r in sample["contrib"]}
    for key, ref in stats.items():
        for name, val in ref.items():
            assert con[key][name] == pytest.approx(val, rel=1e-4, abs=1e-6), (method, key, name)
    # the kept visual tokens per (step, layer), and FastV's count where it acts
    for (s, li), ref in kept.items():
        assert an.kept_at(sample, s, li) == ref, (method, s, li)
        assert rec.kept_by_step_layer[(s, li)] == len(ref)
    if method == "fastv":
        assert len(an.kept_at(sample, 0, K)) == keep_count(sample["n_visual0"], RATIO) < sample["n_visual0"]
    # confidence: top-1 probability of all answer rows per step
    for st, *vals in sample["confidence"]:
        assert dict(zip(an.CONF_FIELDS, vals))["p_all"] == pytest.approx(conf[st], rel=1e-4)
    assert [s for s, _ in sample["sampler_confidence"]] == list(range(len(ids)))


def test_aggregate_means_over_samples():
    def sample(sid, f):
        return {"sample_id": sid, "attention": [[0, 0, 0, 4, *f]], "contrib": [], "confidence": [],
                "sampler_confidence": [], "n_visual0": 2, "kept_segments": [[0, 0, 0, [0, 1]]]}

    data = {"n_layers": 1, "samples": [sample(0, [0.5, 0.25, 0.25]), sample(1, [0.1, 0.6, 0.3])]}
    agg = an.aggregate(data)
    (row,) = agg["attention"]
    assert row["visual"] == pytest.approx(0.3) and row["text"] == pytest.approx(0.425) and row["n_samples"] == 2
    assert agg["kept"] == [{"step": 0, "layer": 0, "n_samples": 2, "n_kept": 2.0, "kept_fraction": 1.0}]


def _check_overlay(layout, kept):
    """Grid cells and pixel masks are set exactly for the kept tokens; the drawn shade darkens
    exactly the covered pixels of the dropped ones."""
    kept_set = set(kept)
    grids = an.panel_grids(layout, kept)
    masks = an.overlay_masks(layout, kept)
    cover = an.coverage_masks(layout)
    count = [np.zeros(m.shape, dtype=int) for m in masks]
    expect_grid = [np.zeros(g.shape, dtype=bool) for g in grids]
    kept_area = [0] * len(masks)
    for i, t in enumerate(layout["tokens"]):
        if t is None:
            continue
        p, r, c, x0, y0, x1, y1 = t
        W, H = layout["panels"][p]["size"]
        assert 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H
        count[p][y0:y1, x0:x1] += 1
        if i in kept_set:
            expect_grid[p][r, c] = True
            kept_area[p] += (x1 - x0) * (y1 - y0)
        if x1 > x0 and y1 > y0:
            assert masks[p][y0:y1, x0:x1].all() == (i in kept_set)
            assert (~masks[p][y0:y1, x0:x1]).all() == (i not in kept_set)
    for p in range(len(masks)):
        assert count[p].max() == 1  # rectangles never overlap within a panel
        assert (grids[p] == expect_grid[p]).all()
        assert int(masks[p].sum()) == kept_area[p]  # nothing marked outside kept rectangles
        alpha = an.shade(masks[p], cover[p])[..., 3]
        assert ((alpha > 0) == (cover[p] & ~masks[p])).all()


def test_overlay_marks_exactly_the_kept_indices(tiny_model, doc_images, runs, tmp_path):
    data, _, rec = runs["fastv"]
    sample = data["samples"][0]
    layout = sample["layout"]
    assert layout is not None and layout["n_tokens"] == rec.n_visual == sample["n_visual0"]
    assert sum(t is None for t in layout["tokens"]) == layout["panels"][1]["rows"]  # one newline per grid row
    kept = an.final_kept(sample, 0)
    assert len(kept) == keep_count(rec.n_visual, RATIO)
    _check_overlay(layout, kept)
    # the other page size and the multi-image (pad) layout agree with what the model produces
    lay1 = an.image_layout(tiny_model, [doc_images[1]])
    _, info = tiny_model.prepare(tiny_model.prompt_ids("q", n_images=1), [doc_images[1]], 4)
    assert lay1["n_tokens"] == info["n_visual"]
    _check_overlay(lay1, list(range(0, lay1["n_tokens"], 3)))
    lay2 = an.image_layout(tiny_model, doc_images)
    _, info2 = tiny_model.prepare(tiny_model.prompt_ids("q", n_images=2), list(doc_images), 4)
    assert lay2["n_tokens"] == info2["n_visual"] == 2 * tiny_model.patches_per_side ** 2
    _check_overlay(lay2, list(range(5, lay2["n_tokens"], 7)))
    path = an.draw_overlay(sample, [doc_images[0]], tmp_path / "o.png", data["n_layers"])
    assert path.stat().st_size > 0


@pytest.mark.parametrize("size", [(1700, 2200), (500, 300), (1000, 200), (384, 384), (3000, 1000)])
def test_layout_token_count_and_partition_for_anyres_sizes(size):
    from PIL import Image

    from dvlm_exp.models import llava_image as li

    pins = li.parse_grid_pinpoints("(1x1),...,(6x6)", 384)
    model = SimpleNamespace(image_size=384, patches_per_side=27, grid_pinpoints=pins, max_tiles=4,
                            image_newline=torch.zeros(1))
    layout = an.image_layout(model, [Image.new("RGB", size)])
    assert layout["n_tokens"] == li.num_visual_tokens(size, pins, 384, 27, 4, newline=True)
    _check_overlay(layout, list(range(1, layout["n_tokens"], 2)))
    # the base view covers the whole image
    assert an.coverage_masks(layout)[0].all()


def test_analyze_script_end_to_end(tmp_path):
    out = tmp_path / "ana"
    # the documented command; the short generation preset (4 steps) only keeps the test fast
    cmd = [sys.executable, str(REPO / "scripts" / "analyze.py"), "model=tiny", "task=synth_docvqa", "limit=1",
           "prune=fastv", "prune.layer=2",
           "progress=false", "task.gen.gen_length=8", "task.gen.block_length=8", "task.gen.steps=4", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["n_samples"] == 1 and summary["prune"] == "fastv" and summary["n_steps"] == 4
    for name in ("attn_visual_heatmap.png", "attn_layer_curves.png", "confidence.png", "contributions.png",
                 "kept_heatmap.png", "overlay_sample0.png", "attention.csv", "confidence.csv", "contributions.csv",
                 "kept.csv", "analysis.json", "summary.json", "image_0_0.png"):
        assert (out / name).stat().st_size > 0, name
        assert name in summary["files"]
    data = json.loads((out / "analysis.json").read_text())
    s = data["samples"][0]
    n0 = s["n_visual0"]
    assert len(an.kept_at(s, 0, 1)) == n0 and len(an.kept_at(s, 0, 2)) == keep_count(n0, 0.5)
    with open(out / "attention.csv") as f:
        for r in csv.DictReader(f):
            assert float(r["visual"]) + float(r["text"]) + float(r["answer"]) == pytest.approx(1.0, abs=1e-5)
    # the figures can be remade from the saved numbers alone (analysis.remake does all of them)
    data2, images = an.load(out)
    assert images[0][0].size == tuple(s["image_sizes"][0])
    assert an.draw_heatmap(data2, tmp_path / "h.png").stat().st_size > 0
    assert an.draw_overlay(data2["samples"][0], images[0], tmp_path / "o.png", data2["n_layers"]).stat().st_size > 0
