"""Analysis: where answer tokens attend across layers and denoising steps, how confident the
sampler is, what visual tokens contribute, and which visual tokens a method kept.

Everything is recorded through the engine's probes (dvlm_exp/engine/engine.py): a probe asks
for score rows inside each layer (`score_request`, computed from the layer's post-RoPE q and k
while SDPA still produces the layer output), sees the final view and logits of each forward
(`after_forward`) and the sampler's per-step confidence (`observe`). Probes never decide, so
any pruning method + schedule runs alongside unchanged and the figures show what it did.

  AttentionProbe   per (step, layer): the head-mean softmax rows of every answer token
                   (masked and unmasked slots), reduced to the fraction of attention mass on
                   visual / text-prompt / answer keys (the three sum to 1 per row), per query
                   group answer (all slots) / masked / unmasked; and, optionally, VisiPruner's
                   contribution statistics of the visual tokens (dvlm_exp/pruning/visipruner.py:
                   c_i = concat over heads of a_{q,i} v_i, o = sum over all keys, query rows =
                   the still-masked slots, all slots when none is; min / mean cos(o - c_i, o),
                   the share of tokens under `contrib_threshold`, mean / max ||c_i||,
                   ||sum_i c_i|| / ||o|| and cos(o - sum_i c_i, o)).
  ConfidenceProbe  per step: mean top-1 probability (float64 softmax over the raw logits) and
                   mean top-1 logit of the answer rows the engine computed (masked / unmasked /
                   all), and the sampler's own signal (`observe`: mean top-1 probability of the
                   masked slots it may unmask, after its banned ids).
  KeptProbe        per (step, layer): which visual tokens are alive (original positions ->
                   indices 0..N-1 into the sample's visual tokens), stored as runs of layers.

Fractions are averaged over heads (head-mean rows), then over the query rows of a group, then
over samples (each sample counts once where it has that (step, layer) and group).

`image_layout` maps visual token indices to image rectangles (LLaDA-V: the 27x27 base view of
the whole image first, then the anyres grid row by row with one image_newline token per row;
several images: one padded-square base view each), `overlay_masks` rasterises a kept set, and
`draw_figures` writes the PNGs. `run` is scripts/analyze.py's job (docs/analysis.md).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.state import Roles

KEY_TYPES = ("visual", "text", "answer")
QUERY_GROUPS = ("answer", "masked", "unmasked")
CONTRIB_FIELDS = ("n_visual", "min_cos", "mean_cos", "frac_below", "mean_norm", "max_norm",
                  "visual_share", "cos_without_visual")
CONF_FIELDS = ("n_masked", "n_unmasked", "p_masked", "p_unmasked", "p_all",
               "logit_masked", "logit_unmasked", "logit_all")
ANALYSIS_VERSION = 1


# ---------------------------------------------------------------------------------- probes
class _Probe:
    """Per-sample bookkeeping shared by the probes: `samples` holds one dict per sample.

    `begin_sample(sample_id)` starts a new one (scripts/analyze.py calls it per document); without
    it a forward at a step this sample already finished starts a new sample by itself."""

    def __init__(self) -> None:
        self.samples: list[dict] = []
        self.current: dict | None = None
        self._done_steps: set = set()

    def _new(self, sample_id) -> dict:
        return {"sample_id": sample_id}

    def begin_sample(self, sample_id=None) -> None:
        self.current = self._new(len(self.samples) if sample_id is None else sample_id)
        self.samples.append(self.current)
        self._done_steps = set()

    def _sample(self, step: int) -> dict:
        if self.current is None or step in self._done_steps:
            self.begin_sample()
        return self.current

    def score_request(self, view):
        return None

    def after_forward(self, view, logits, rows) -> None:
        self._done_steps.add(view.step)


class AttentionProbe(_Probe):
    """Answer -> {visual, text, answer} attention fractions per (step, layer) and query group,
    plus (``contributions=True``) the visual tokens' contribution statistics."""

    def __init__(self, contributions: bool = True, contrib_threshold: float = 0.995):
        super().__init__()
        self.contributions = bool(contributions)
        self.contrib_threshold = float(contrib_threshold)
        self._pending = None

    def _new(self, sample_id) -> dict:
        # attention rows: [step, layer, group index, n query rows, f_visual, f_text, f_answer]
        return {"sample_id": sample_id, "attention": [], "contrib": []}

    def begin_sample(self, sample_id=None) -> None:
        self._pending = None
        super().begin_sample(sample_id)

    def score_request(self, view):
        self._flush()
        self._sample(view.step)
        q = view.response_index
        if q.numel() == 0:
            return None
        c = self.contributions and view.n_visual > 0
        req = ScoreRequest(q, keep_rows=not c, keep_heads=c, keep_values=c)
        self._pending = (view.step, view.layer, req, view.roles.clone(), view.seq.is_mask.clone())
        return req

    def after_forward(self, view, logits, rows) -> None:
        self._flush()
        super().after_forward(view, logits, rows)

    def _flush(self) -> None:
        if self._pending is None:
            return
        step, layer, req, roles, is_mask = self._pending
        self._pending = None
        if req.column_mean is None:  # never computed (the layer did not run with it)
            return
        heads = req.heads
        probs = req.rows if req.rows is not None else heads.mean(0)  # [r, n] head-mean rows
        roles = roles.to(probs.device)
        onehot = torch.stack([roles == Roles.VISUAL, roles == Roles.TEXT, roles == Roles.RESPONSE], 1)
        mass = probs @ onehot.to(probs.dtype)  # [r, 3]
        is_mask = is_mask.to(probs.device)
        out = self.current["attention"]
        for g, sel in enumerate((None, is_mask, ~is_mask)):
            m = mass if sel is None else mass[sel]
            if m.shape[0]:
                out.append([step, layer, g, int(m.shape[0]), *m.mean(0).tolist()])
        if heads is not None:
            vis = torch.nonzero(roles == Roles.VISUAL).squeeze(1)
            qsel = is_mask if bool(is_mask.any()) else torch.ones_like(is_mask)
            self.current["contrib"].append([step, layer, *contribution_stats(
                heads[:, qsel], req.values, vis, self.contrib_threshold)])


def contribution_stats(heads: torch.Tensor, values: torch.Tensor, vis: torch.Tensor,
                       threshold: float = 0.995) -> list[float]:
    """VisiPruner's statistics for query rows `heads` [h, r, n] (averaged per head, as the
    method's masked_response query set) and values [h, n, dh]: see CONTRIB_FIELDS."""
    from dvlm_exp.pruning.visipruner import contributions

    if vis.numel() == 0:
        return [0] + [float("nan")] * (len(CONTRIB_FIELDS) - 1)
    cos, norms = contributions(SimpleNamespace(heads=heads, values=values), vis)
    a = heads.mean(dim=1)  # [h, n]
    o = torch.einsum("hn,hnd->hd", a, values).reshape(-1)
    c_sum = torch.einsum("hn,hnd->hd", a[:, vis], values[:, vis]).reshape(-1)  # all visual tokens
    share = float(c_sum.norm() / o.norm().clamp_min(1e-30))
    cos_wo = float(F.cosine_similarity((o - c_sum)[None], o[None], dim=-1))
    return [int(vis.numel()), float(cos.min()), float(cos.mean()), float((cos < threshold).float().mean()),
            float(norms.mean()), float(norms.max()), share, cos_wo]


class ConfidenceProbe(_Probe):
    """Per step: top-1 probability and top-1 logit of the answer rows (masked / unmasked / all),
    and the sampler's confidence signal."""

    def _new(self, sample_id) -> dict:
        return {"sample_id": sample_id, "steps": [], "sampler": []}  # steps: [step, *CONF_FIELDS]

    def after_forward(self, view, logits, rows) -> None:
        s = self._sample(view.step)
        G = view.seq.gen_length
        offs = (rows - (view.roles.numel() - G)).to(view.seq.response_ids.device)
        is_mask = view.seq.is_mask[offs].to(logits.device)
        lg = logits.double()
        top = lg.max(dim=-1).values
        p = torch.exp(top - torch.logsumexp(lg, dim=-1))

        def mean(x, sel):
            x = x[sel]
            return float(x.mean()) if x.numel() else float("nan")

        s["steps"].append([view.step, int(is_mask.sum()), int((~is_mask).sum()),
                           mean(p, is_mask), mean(p, ~is_mask), float(p.mean()),
                           mean(top, is_mask), mean(top, ~is_mask), float(top.mean())])
        super().after_forward(view, logits, rows)

    def observe(self, step: int, confidence: float) -> None:
        if self.current is not None:
            self.current["sampler"].append([int(step), float(confidence)])


class KeptProbe(_Probe):
    """The visual tokens alive at every (step, layer), as indices into the sample's visual
    tokens (original order). `segments`: [step, first layer, last layer, indices] runs."""

    def _new(self, sample_id) -> dict:
        return {"sample_id": sample_id, "n_visual": 0, "visual_positions": [], "segments": []}

    def score_request(self, view):
        s = self._sample(view.step)
        if not s["visual_positions"] and view.step == 0:
            seq = view.seq  # the state at the start of the first forward: every visual token
            s["visual_positions"] = seq.positions[seq.roles == Roles.VISUAL].tolist()
            s["n_visual"] = len(s["visual_positions"])
        pos0 = torch.tensor(s["visual_positions"], dtype=torch.long)
        pos = view.positions[view.roles == Roles.VISUAL].cpu()
        idx = torch.searchsorted(pos0, pos).tolist() if pos0.numel() else []
        seg = s["segments"][-1] if s["segments"] else None
        if seg is not None and seg[0] == view.step and seg[3] == idx:
            seg[2] = view.layer
        else:
            s["segments"].append([view.step, view.layer, view.layer, idx])
        return None


def _segments(sample: dict) -> list:
    return sample["kept_segments"] if "kept_segments" in sample else sample["segments"]


def kept_at(sample: dict, step: int, layer: int) -> list[int] | None:
    """Visual token indices alive at (step, layer) of a KeptProbe sample (a layer the probe did
    not see, e.g. one the visual tokens skipped, takes the last run before it); None: no data."""
    found = None
    for st, lo, hi, idx in _segments(sample):
        if st == step and lo <= layer:
            found = idx
    return found


def final_kept(sample: dict, step: int) -> list[int] | None:
    """The visual tokens the last layer of `step` saw."""
    segs = [s for s in _segments(sample) if s[0] == step]
    return segs[-1][3] if segs else None


# ---------------------------------------------------------------------------------- session
class AnalysisSession:
    """The three probes plus per-sample metadata (question, prediction, image layout)."""

    def __init__(self, model=None, contributions: bool = True, contrib_threshold: float = 0.995,
                 keep_images: int | None = None):
        self.model = model
        self.keep_images = keep_images  # images kept for the first N samples (overlays); None: all
        self.attention = AttentionProbe(contributions, contrib_threshold)
        self.confidence = ConfidenceProbe()
        self.kept = KeptProbe()
        self.meta: list[dict] = []
        self.images: dict = {}  # sample_id -> list of PIL images (for overlays)

    @property
    def probes(self) -> list:
        return [self.attention, self.confidence, self.kept]

    def begin_sample(self, sample_id, question: str = "", images=()) -> None:
        for p in self.probes:
            p.begin_sample(sample_id)
        imgs = [im for im in (images or []) if hasattr(im, "size") and hasattr(im, "convert")]
        if self.keep_images is None or len(self.meta) < self.keep_images:
            self.images[sample_id] = imgs
        layout = None
        if self.model is not None and imgs and len(imgs) == len(images or []):
            try:
                layout = image_layout(self.model, imgs)
            except Exception:  # noqa: BLE001 - a model without the LLaDA-V image path: no overlay
                layout = None
        self.meta.append({"sample_id": sample_id, "question": question,
                          "image_sizes": [list(im.size) for im in imgs], "layout": layout})

    def end_sample(self, prediction: str, record=None) -> None:
        m = self.meta[-1]
        m["prediction"] = prediction
        if record is not None:
            m["n_visual"] = int(record.n_visual)
            m["n_forwards"] = int(record.n_forwards)
            m["latency_s"] = float(record.latency_s)
        lay = m.get("layout")
        if lay is not None and lay["n_tokens"] != self.kept.current["n_visual"]:
            m["layout"] = None  # the token layout does not match what the model produced

    def to_json(self, config: dict | None = None, n_layers: int | None = None) -> dict:
        samples = []
        for m, a, c, k in zip(self.meta, self.attention.samples, self.confidence.samples, self.kept.samples):
            samples.append({**m, "attention": a["attention"], "contrib": a["contrib"], "confidence": c["steps"],
                            "sampler_confidence": c["sampler"], "n_visual0": k["n_visual"],
                            "visual_positions": k["visual_positions"], "kept_segments": k["segments"]})
        data = {"version": ANALYSIS_VERSION, "config": config, "n_layers": n_layers,
                "contrib_threshold": self.attention.contrib_threshold,
                "key_types": list(KEY_TYPES), "query_groups": list(QUERY_GROUPS),
                "contrib_fields": list(CONTRIB_FIELDS), "conf_fields": list(CONF_FIELDS),
                "attention_columns": ["step", "layer", "group", "n_rows", *KEY_TYPES],
                "samples": samples}
        data["aggregate"] = aggregate(data)
        return data


# ---------------------------------------------------------------------------------- aggregation
def _nanmean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate(data: dict) -> dict:
    """Mean over samples of the per-sample numbers: attention rows per (step, layer, group),
    confidence per step, contributions per (step, layer) and per layer, kept counts per (step, layer)."""
    samples = data["samples"]
    att: dict = {}
    for s in samples:
        for step, layer, g, n, *f in s["attention"]:
            att.setdefault((step, layer, g), []).append((n, f))
    attention = []
    for (step, layer, g), vals in sorted(att.items()):
        row = {"step": step, "layer": layer, "query": QUERY_GROUPS[g], "n_samples": len(vals),
               "n_rows": sum(n for n, _ in vals) / len(vals)}
        for j, kt in enumerate(KEY_TYPES):
            row[kt] = sum(f[j] for _, f in vals) / len(vals)
        attention.append(row)

    conf: dict = {}
    for s in samples:
        sampler = {st: c for st, c in s.get("sampler_confidence", [])}
        for st, *vals in s["confidence"]:
            conf.setdefault(st, []).append(vals + [sampler.get(st, float("nan"))])
    confidence = []
    for st, vals in sorted(conf.items()):
        row = {"step": st, "n_samples": len(vals)}
        for j, name in enumerate(CONF_FIELDS + ("sampler_confidence",)):
            row[name] = _nanmean([v[j] for v in vals])
        confidence.append(row)

    con: dict = {}
    by_layer: dict = {}
    for s in samples:
        for step, layer, *vals in s["contrib"]:
            con.setdefault((step, layer), []).append(vals)
            by_layer.setdefault(layer, []).append(vals)

    def contrib_rows(groups, keys):
        out = []
        for key, vals in sorted(groups.items()):
            row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
            row["n"] = len(vals)
            for j, name in enumerate(CONTRIB_FIELDS):
                row[name] = _nanmean([v[j] for v in vals])
            out.append(row)
        return out

    kept: dict = {}
    for s in samples:
        n0 = s.get("n_visual0") or 0
        steps = sorted({seg[0] for seg in _segments(s)})
        for st in steps:
            for layer in range(data.get("n_layers") or 1 + max(seg[2] for seg in _segments(s))):
                idx = kept_at(s, st, layer)
                if idx is not None:
                    kept.setdefault((st, layer), []).append((len(idx), len(idx) / n0 if n0 else float("nan")))
    kept_rows = [{"step": st, "layer": layer, "n_samples": len(v), "n_kept": sum(a for a, _ in v) / len(v),
                  "kept_fraction": _nanmean([b for _, b in v])} for (st, layer), v in sorted(kept.items())]
    return {"attention": attention, "confidence": confidence,
            "contributions": contrib_rows(con, ("step", "layer")),
            "contributions_by_layer": contrib_rows(by_layer, ("layer",)), "kept": kept_rows}


def attention_matrix(data: dict, key: str = "visual", query: str = "answer") -> np.ndarray:
    """[layers, steps] of the aggregated fraction `key` for query group `query` (NaN where none)."""
    rows = [r for r in data["aggregate"]["attention"] if r["query"] == query]
    n_layers = data.get("n_layers") or (1 + max((r["layer"] for r in data["aggregate"]["attention"]), default=-1))
    n_steps = 1 + max((r["step"] for r in data["aggregate"]["attention"]), default=-1)
    m = np.full((n_layers, n_steps), np.nan)
    for r in rows:
        m[r["layer"], r["step"]] = r[key]
    return m


# ---------------------------------------------------------------------------------- image layout
def _bounds(n: int, lo: float, hi: float, scale: float, offset: float, limit: int) -> list[int]:
    """n + 1 cell edges from `lo` to `hi` (patch units), mapped to image pixels
    ((x * scale - offset), rounded, clipped to [0, limit]): monotone, so cells partition."""
    return [int(min(max(round((lo + i * (hi - lo) / n) * scale - offset), 0), limit)) for i in range(n + 1)]


def _grid_tokens(panel: int, rows: int, cols: int, xs: list[int], ys: list[int], newline: bool) -> list:
    out = []
    for i in range(rows):
        for j in range(cols):
            out.append([panel, i, j, xs[j], ys[i], xs[j + 1], ys[i + 1]])
        if newline:
            out.append(None)
    return out


def image_layout(model, images: list) -> dict:
    """Visual token index -> image rectangle for a LLaDA-V-style model (attributes `image_size`,
    `patches_per_side`, `grid_pinpoints`, `max_tiles`, `image_newline`).

    One image (anyres): P = pps^2 base tokens (the image stretched to a square: cell (r, c) is
    [c*W/pps, (c+1)*W/pps) x [r*H/pps, ...)), then the unpadded (possibly anyres_max-downscaled)
    tile grid row by row, each row followed by one newline token (no rectangle). Several images
    (pad mode): one base view of the image centred on a square canvas each.
    Returns {"n_tokens", "panels": [{"image", "name", "rows", "cols", "size"}], "tokens": [[panel,
    row, col, x0, y0, x1, y1] | None per visual token]} (pixel rectangles, x1/y1 exclusive).
    """
    from dvlm_exp.models import llava_image as li

    S = int(model.image_size)
    pps = int(model.patches_per_side)
    newline = getattr(model, "image_newline", None) is not None
    panels, tokens = [], []
    if len(images) == 1:
        W, H = images[0].size
        panels.append({"image": 0, "name": f"base {pps}x{pps}", "rows": pps, "cols": pps, "size": [W, H]})
        tokens += _grid_tokens(0, pps, pps, _bounds(pps, 0, pps, W / pps, 0, W), _bounds(pps, 0, pps, H / pps, 0, H), False)
        cols, rows = li.get_anyres_grid_shape((W, H), model.grid_pinpoints, S)
        gh, gw = rows * pps, cols * pps
        t, b, left, r = li.unpadded_shape(gh, gw, (W, H))
        th, tw = li.anyres_max_target_shape(b - t, r - left, model.max_tiles, pps)
        # the image's place on the padded canvas (llava_image._resize_and_pad arithmetic)
        cw, ch = cols * S, rows * S
        if cw / W < ch / H:
            nw, nh = cw, min(math.ceil(H * cw / W), ch)
        else:
            nw, nh = min(math.ceil(W * ch / H), cw), ch
        ox, oy = (cw - nw) // 2, (ch - nh) // 2
        px = S / pps  # canvas pixels per patch
        xs = _bounds(tw, left, r, px * W / nw, ox * W / nw, W)
        ys = _bounds(th, t, b, px * H / nh, oy * H / nh, H)
        panels.append({"image": 0, "name": f"anyres grid {th}x{tw}", "rows": th, "cols": tw, "size": [W, H]})
        tokens += _grid_tokens(1, th, tw, xs, ys, newline)
    else:
        for k, im in enumerate(images):
            W, H = im.size
            side = max(W, H)
            ox, oy = (side - W) // 2, (side - H) // 2
            panels.append({"image": k, "name": f"image {k} {pps}x{pps}", "rows": pps, "cols": pps, "size": [W, H]})
            tokens += _grid_tokens(k, pps, pps, _bounds(pps, 0, pps, side / pps, ox, W),
                                   _bounds(pps, 0, pps, side / pps, oy, H), False)
    return {"n_tokens": len(tokens), "panels": panels, "tokens": tokens}


def panel_grids(layout: dict, kept) -> list[np.ndarray]:
    """Per panel a [rows, cols] bool array: True at the cells of kept visual tokens."""
    grids = [np.zeros((p["rows"], p["cols"]), dtype=bool) for p in layout["panels"]]
    for i in kept:
        t = layout["tokens"][i]
        if t is not None:
            grids[t[0]][t[1], t[2]] = True
    return grids


def overlay_masks(layout: dict, kept) -> list[np.ndarray]:
    """Per panel a [H, W] bool pixel mask of the panel's image: True inside the rectangle of
    every kept visual token (newline tokens have none), False elsewhere."""
    masks = [np.zeros((p["size"][1], p["size"][0]), dtype=bool) for p in layout["panels"]]
    for i in kept:
        t = layout["tokens"][i]
        if t is not None:
            p, _, _, x0, y0, x1, y1 = t
            masks[p][y0:y1, x0:x1] = True
    return masks


def coverage_masks(layout: dict) -> list[np.ndarray]:
    """Pixels covered by some visual token of each panel (outside: letterbox padding)."""
    return overlay_masks(layout, range(layout["n_tokens"]))


def shade(mask: np.ndarray, cover: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """The RGBA layer drawn over a panel: black with `alpha` on covered pixels of dropped tokens,
    transparent on kept tokens and outside every token."""
    out = np.zeros(mask.shape + (4,))
    out[cover & ~mask] = (0, 0, 0, alpha)
    return out


def survival_maps(layout: dict, sample: dict, n_layers: int) -> list[np.ndarray]:
    """Per panel a [H, W] float map: the fraction of (step, layer) calls each token was alive in."""
    alive = np.zeros(layout["n_tokens"])
    total = 0
    for st in sorted({s[0] for s in _segments(sample)}):
        for layer in range(n_layers):
            idx = kept_at(sample, st, layer)
            if idx is not None:
                alive[idx] += 1
                total += 1
    maps = [np.full((p["size"][1], p["size"][0]), np.nan) for p in layout["panels"]]
    for i, t in enumerate(layout["tokens"]):
        if t is not None:
            p, _, _, x0, y0, x1, y1 = t
            maps[p][y0:y1, x0:x1] = alive[i] / max(total, 1)
    return maps


# ---------------------------------------------------------------------------------- figures
def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _int_ticks(*axes, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if y:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def default_steps(n_steps: int, k: int = 3) -> list[int]:
    if n_steps <= 0:
        return []
    return sorted({0, (n_steps - 1) // 2, n_steps - 1})[:k] if n_steps > 2 else list(range(n_steps))


def overlay_steps(sample: dict, n_max: int = 4) -> list[int]:
    """Steps whose final kept set differs from the previous step's, plus the last step."""
    steps = sorted({s[0] for s in _segments(sample)})
    out, prev = [], None
    for st in steps:
        cur = final_kept(sample, st)
        if cur != prev:
            out.append(st)
        prev = cur
    if steps and steps[-1] not in out:
        out.append(steps[-1])
    if len(out) > n_max:
        out = out[: n_max - 1] + [out[-1]]
    return out


def draw_heatmap(data: dict, path: Path) -> Path:
    fig = _figure(13, 4)
    axes = fig.subplots(1, 3)
    mats = [attention_matrix(data, "visual", g) for g in QUERY_GROUPS]
    vmax = np.nanmax([np.nanmax(m) if np.isfinite(m).any() else 0 for m in mats]) or 1.0
    for ax, g, m in zip(axes, QUERY_GROUPS, mats):
        im = ax.imshow(m, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{g} queries -> visual keys")
        ax.set_xlabel("denoising step")
        ax.set_ylabel("layer")
        _int_ticks(ax, y=True)
    fig.colorbar(im, ax=list(axes), label="attention fraction")
    fig.suptitle("Fraction of attention mass on visual tokens (mean over heads, query rows, samples)")
    fig.savefig(path)
    return path


def draw_layer_curves(data: dict, path: Path, steps: list[int] | None = None) -> Path:
    n_steps = attention_matrix(data).shape[1]
    steps = [s for s in (steps if steps else default_steps(n_steps)) if 0 <= s < n_steps] or [0]
    fig = _figure(4.2 * len(steps), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(steps), sharey=True))
    colors = {"visual": "tab:red", "text": "tab:blue", "answer": "tab:green"}
    for ax, st in zip(axes, steps):
        for kt in KEY_TYPES:
            for g, style in (("answer", "-"), ("masked", ":")):
                m = attention_matrix(data, kt, g)
                if st < m.shape[1] and np.isfinite(m[:, st]).any():
                    ax.plot(np.arange(m.shape[0]), m[:, st], style, color=colors[kt], marker="o", ms=3,
                            label=f"{kt} ({g} queries)")
        ax.set_title(f"step {st}")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        _int_ticks(ax)
    axes[0].set_ylabel("attention fraction")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle("Attention from answer tokens to each token type, per layer")
    fig.savefig(path)
    return path


def draw_confidence(data: dict, path: Path) -> Path:
    rows = data["aggregate"]["confidence"]
    steps = [r["step"] for r in rows]
    fig = _figure(10, 3.6)
    a, b = fig.subplots(1, 2)
    for key, label in (("p_masked", "masked slots"), ("p_unmasked", "unmasked slots"), ("p_all", "all slots"),
                       ("sampler_confidence", "sampler signal")):
        a.plot(steps, [r[key] for r in rows], marker="o", ms=3, label=label)
    a.set_title("top-1 probability of answer tokens")
    a.set_xlabel("denoising step")
    a.set_ylim(0, 1.02)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    for key, label in (("logit_masked", "masked slots"), ("logit_unmasked", "unmasked slots"), ("logit_all", "all slots")):
        b.plot(steps, [r[key] for r in rows], marker="o", ms=3, label=label)
    b.set_title("top-1 logit of answer tokens")
    b.set_xlabel("denoising step")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    _int_ticks(a, b)
    fig.savefig(path)
    return path


def draw_contributions(data: dict, path: Path) -> Path | None:
    rows = data["aggregate"]["contributions_by_layer"]
    if not rows:
        return None
    layers = [r["layer"] for r in rows]
    fig = _figure(13, 3.6)
    a, b, c = fig.subplots(1, 3)
    for key in ("min_cos", "mean_cos", "cos_without_visual"):
        a.plot(layers, [r[key] for r in rows], marker="o", ms=3, label=key)
    a.set_title("cos(o - c_i, o)  (1 = token i changes nothing)")
    for key in ("mean_norm", "max_norm"):
        b.plot(layers, [r[key] for r in rows], marker="o", ms=3, label=f"{key} ||c_i||")
    b.set_title("contribution norms")
    thr = data.get("contrib_threshold", 0.995)
    for key, label in (("visual_share", "||sum_i c_i|| / ||o||"), ("frac_below", f"share of tokens with cos < {thr}")):
        c.plot(layers, [r[key] for r in rows], marker="o", ms=3, label=label)
    c.set_title("visual part of the output")
    for ax in (a, b, c):
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        _int_ticks(ax)
    fig.suptitle("VisiPruner contribution statistics of visual tokens (masked-answer queries, mean over steps, samples)")
    fig.savefig(path)
    return path


def draw_kept(data: dict, path: Path) -> Path | None:
    rows = data["aggregate"]["kept"]
    if not rows:
        return None
    L = 1 + max(r["layer"] for r in rows)
    S = 1 + max(r["step"] for r in rows)
    m = np.full((L, S), np.nan)
    for r in rows:
        m[r["layer"], r["step"]] = r["kept_fraction"]
    fig = _figure(6, 4)
    ax = fig.subplots()
    im = ax.imshow(m, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("layer")
    ax.set_title("fraction of visual tokens alive")
    _int_ticks(ax, y=True)
    fig.colorbar(im, ax=ax)
    fig.savefig(path)
    return path


def draw_overlay(sample: dict, images: list, path: Path, n_layers: int, steps: list[int] | None = None) -> Path | None:
    """The sample's image(s) per panel (base view, anyres grid) with the visual tokens alive at
    the last layer of each chosen step shown, the dropped ones darkened; last row: the fraction
    of (step, layer) calls each token was alive in."""
    layout = sample.get("layout")
    if layout is None or not images:
        return None
    steps = steps if steps else overlay_steps(sample)
    panels = layout["panels"]
    fig = _figure(3.4 * len(panels), 3.1 * (len(steps) + 1))
    axes = np.array(fig.subplots(len(steps) + 1, len(panels), squeeze=False))
    cover = coverage_masks(layout)
    n0 = sample.get("n_visual0") or layout["n_tokens"]
    for r, st in enumerate(steps):
        kept = final_kept(sample, st) or []
        masks = overlay_masks(layout, kept)
        for c, p in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.asarray(images[p["image"]].convert("RGB")))
            ax.imshow(shade(masks[c], cover[c]), interpolation="nearest")
            ax.set_title(f"step {st}: {len(kept)}/{n0} kept\n{p['name']}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    maps = survival_maps(layout, sample, n_layers)
    for c, p in enumerate(panels):
        ax = axes[-1, c]
        ax.imshow(np.asarray(images[p["image"]].convert("L")), cmap="gray")
        im = ax.imshow(maps[c], cmap="magma", vmin=0, vmax=1, alpha=0.6, interpolation="nearest")
        ax.set_title(f"alive fraction over (step, layer)\n{p['name']}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[-1]), shrink=0.8)
    fig.suptitle(f"sample {sample['sample_id']}: kept visual tokens (dark = dropped)", fontsize=10)
    fig.savefig(path)
    return path


def draw_figures(data: dict, out_dir: Path, images: dict | None = None, steps: list[int] | None = None,
                 overlay_samples: int = 2, overlay_steps_: list[int] | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_layers = data.get("n_layers") or 1
    paths = [draw_heatmap(data, out_dir / "attn_visual_heatmap.png"),
             draw_layer_curves(data, out_dir / "attn_layer_curves.png", steps),
             draw_confidence(data, out_dir / "confidence.png"),
             draw_contributions(data, out_dir / "contributions.png"),
             draw_kept(data, out_dir / "kept_heatmap.png")]
    images = images or {}
    for s in data["samples"][: max(0, int(overlay_samples))]:
        imgs = images.get(s["sample_id"]) or images.get(str(s["sample_id"]))
        paths.append(draw_overlay(s, imgs or [], out_dir / f"overlay_sample{s['sample_id']}.png", n_layers, overlay_steps_))
    return [p for p in paths if p is not None]


# ---------------------------------------------------------------------------------- files
def _write_csv(path: Path, rows: list[dict]) -> Path:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def _clean(x):
    """NaN / inf -> None (strict JSON: null), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_tables(data: dict, out_dir: Path, images: dict | None = None, overlay_samples: int = 2) -> list[Path]:
    """analysis.json (everything, incl. per-sample raw numbers and layouts) + one CSV per
    aggregate + the overlay samples' images (image_<sample>_<k>.png) so figures can be remade."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = data["aggregate"]
    paths = [_write_csv(out_dir / f"{name}.csv", agg[name]) for name in
             ("attention", "confidence", "contributions", "contributions_by_layer", "kept")]
    tmp = out_dir / "analysis.json.tmp"
    tmp.write_text(json.dumps(_clean(data), default=str, allow_nan=False))
    tmp.replace(out_dir / "analysis.json")
    paths.append(out_dir / "analysis.json")
    for s in data["samples"][: max(0, int(overlay_samples))]:
        for k, im in enumerate((images or {}).get(s["sample_id"], [])):
            p = out_dir / f"image_{s['sample_id']}_{k}.png"
            im.convert("RGB").save(p)
            paths.append(p)
    return paths


def load(out_dir: Path) -> tuple[dict, dict]:
    """(analysis.json, {sample_id: [images]}) of a previous analysis directory."""
    from PIL import Image

    out_dir = Path(out_dir)
    path = out_dir if out_dir.suffix == ".json" else out_dir / "analysis.json"
    data = json.loads(path.read_text())
    images = {}
    for s in data["samples"]:
        files = sorted(path.parent.glob(f"image_{s['sample_id']}_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if files:
            images[s["sample_id"]] = [Image.open(f).convert("RGB") for f in files]
    return data, images


# ---------------------------------------------------------------------------------- the job
def _int_list(v) -> list[int] | None:
    if v is None or v == "":
        return None
    return [int(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, str)
                             else str(v).split(","))] or None


def options(cfg) -> dict:
    """`analysis.*` keys with their defaults (docs/analysis.md)."""
    a = cfg.get("analysis") or {}
    return {"out": a.get("out"), "steps": _int_list(a.get("steps")),
            "overlay": int(a.get("overlay", 2)), "overlay_steps": _int_list(a.get("overlay_steps")),
            "contributions": bool(a.get("contributions", True)),
            "contrib_threshold": float(a.get("contrib_threshold", 0.995)), "remake": a.get("remake")}


def _tapped_generator(cfg, model, session: AnalysisSession):
    from omegaconf import OmegaConf

    from dvlm_exp.generator import GenPreset, Generator
    from dvlm_exp.runner import build_pruner, build_schedule

    class AnalysisGenerator(Generator):
        """The runner's Generator with the probes, telling the session where samples start."""

        def generate(self, question, images, until=None, sample_id=0):
            session.begin_sample(sample_id, question, images)
            text = super().generate(question, images, until=until, sample_id=sample_id)
            session.end_sample(text, self.recorder.current)
            return text

    preset = GenPreset(**OmegaConf.to_container(cfg.task.gen, resolve=True))
    return AnalysisGenerator(model, build_pruner(cfg), build_schedule(cfg), preset,
                             position_ids=cfg.prune.get("position_ids", "keep"), seed=int(cfg.seed),
                             probes=session.probes)


def _log_wandb(cfg, out_dir: Path, figures: list[Path], summary: dict) -> str | None:
    """W&B images of the figures (offline files without WANDB_API_KEY); never fails the job."""
    try:
        import wandb
        from omegaconf import OmegaConf

        from dvlm_exp.wandb_log import WandbSink

        sink = WandbSink(cfg, OmegaConf.to_container(cfg, resolve=True), out_dir)
        try:
            sink.run.log({f"analysis/{p.stem}": wandb.Image(str(p)) for p in figures})
            sink.run.summary.update({f"analysis/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        finally:
            sink.finish(0)
        return sink.mode
    except Exception as e:  # noqa: BLE001
        print(f"warning: W&B logging failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def summarize(data: dict) -> dict:
    agg = data["aggregate"]
    att = [r for r in agg["attention"] if r["query"] == "answer"]
    conf = agg["confidence"]
    return {
        "n_samples": len(data["samples"]),
        "n_layers": data.get("n_layers"),
        "n_steps": 1 + max((r["step"] for r in att), default=-1),
        "answer_to_visual": _nanmean([r["visual"] for r in att]),
        "answer_to_text": _nanmean([r["text"] for r in att]),
        "answer_to_answer": _nanmean([r["answer"] for r in att]),
        "confidence_first": conf[0]["p_masked"] if conf else None,
        "confidence_last": conf[-1]["p_masked"] if conf else None,
        "kept_fraction_last": agg["kept"][-1]["kept_fraction"] if agg["kept"] else None,
    }


def run(cfg, out_dir: Path) -> dict:
    """scripts/analyze.py: model once, the task's first `limit` documents through lmms-eval (the
    same prompts and images as run.py), the generator with the configured method + schedule and
    the probes; writes tables, JSON and figures into out_dir; returns the summary."""
    from omegaconf import OmegaConf

    opt = options(cfg)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if opt["remake"]:
        data, images = load(Path(opt["remake"]))
        figs = draw_figures(data, out_dir, images, opt["steps"], opt["overlay"], opt["overlay_steps"])
        return {"out": str(out_dir), "remade_from": str(opt["remake"]), **summarize(data),
                "files": sorted(p.name for p in figs)}

    from dvlm_exp import judge as judging
    from dvlm_exp.runner import evaluate, load_model
    from dvlm_exp.validate import check

    check(cfg)
    model = load_model(cfg)
    session = AnalysisSession(model, opt["contributions"], opt["contrib_threshold"], keep_images=opt["overlay"])
    gen = _tapped_generator(cfg, model, session)
    res, predictions = evaluate(cfg, gen, predict_only=judging.task_judging(cfg) is not None)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    data = session.to_json(config=config, n_layers=len(model.layers))
    metrics = {k: v for k, v in ((res or {}).get("results", {}).get(cfg.task.lmms_task, {}) or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    data["metrics"] = metrics
    files = write_tables(data, out_dir, session.images, opt["overlay"])
    figs = draw_figures(data, out_dir, session.images, opt["steps"], opt["overlay"], opt["overlay_steps"])
    summary = {"out": str(out_dir), "model": cfg.model.name, "prune": cfg.prune.name, "task": cfg.task.name,
               **summarize(data), "metrics": metrics, "wall_s": round(time.perf_counter() - t0, 2)}
    if cfg.logger.name == "wandb":
        summary["wandb"] = _log_wandb(cfg, out_dir, figs, summary)
    summary["files"] = sorted([p.name for p in files + figs] + ["summary.json"])
    summary = _clean(summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(cfg) -> dict | None:
    """Entry of scripts/analyze.py: one `error:` line and exit 2 on bad input, JSON summary last."""
    from hydra.core.hydra_config import HydraConfig

    from dvlm_exp.models.checkpoint import CheckpointError
    from dvlm_exp.validate import ConfigError

    out = options(cfg)["out"] or HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg, Path(out))
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    s = _clean(summary)

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(f"dvlm_exp analysis | samples={s['n_samples']} steps={s['n_steps']} layers={s['n_layers']} "
          f"answer->visual {fmt(s['answer_to_visual'])} text {fmt(s['answer_to_text'])} answer {fmt(s['answer_to_answer'])}",
          flush=True)
    print(f"  files in {s['out']}: {', '.join(s['files'])}", flush=True)
    print(json.dumps(s, default=str), flush=True)
    return s
