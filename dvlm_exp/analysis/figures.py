"""The analysis figures (matplotlib PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dvlm_exp.analysis.aggregate import attention_matrix
from dvlm_exp.analysis.layout import coverage_masks, overlay_masks, shade, survival_maps
from dvlm_exp.analysis.probes import KEY_TYPES, QUERY_GROUPS, _segments, final_kept


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
