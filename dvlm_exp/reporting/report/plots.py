"""The report's plots: accuracy vs FLOPs reduction (Pareto front), vs keep ratio, vs layer."""

from __future__ import annotations

import math
from pathlib import Path
from dvlm_exp.reporting.report.labels import SCORE_SPECS
from dvlm_exp.reporting.report.published import _eq_opt
from dvlm_exp.reporting.report.tables import _fmt_key


# --------------------------------------------------------------------------------------------------
# Plots

def make_plots(runs: list[dict], pub_rows: list[dict], plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    scored = [r for r in runs if r["score"] is not None]
    written = []
    for model in sorted({r["model"] for r in scored}):
        mr = [r for r in scored if r["model"] == model]
        benches = []  # one panel per benchmark and generation preset (ChartQA: the study's 8 steps vs 16)
        for r in mr:
            if (_bench_of(r), r["gen"]) not in benches:
                benches.append((_bench_of(r), r["gen"]))
        n_gen = {b: sum(1 for bb, _ in benches if bb == b) for b, _ in benches}
        for kind in ("pareto", "ratio", "layer"):
            panels = []
            for b, gen in benches:
                br = [r for r in mr if _bench_of(r) == b and r["gen"] == gen]
                if n_gen[b] > 1:
                    b = f"{b} (gen {gen})"
                if kind == "layer" and not _layer_lines(br):
                    continue
                if kind == "ratio" and not [r for r in br if r["method"] != "baseline" and r["keep_ratio"] is not None]:
                    continue
                panels.append((b, br))
            if not panels:
                continue
            n = len(panels)
            ncols = min(3, n)
            nrows = math.ceil(n / ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
            for ax, (b, br) in zip(axes.flat, panels):
                {"pareto": _plot_pareto, "ratio": _plot_ratio, "layer": _plot_layer}[kind](ax, br, pub_rows)
                score_axis(ax, br, b)
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            title = {"pareto": "accuracy vs FLOPs reduction (Pareto front dashed)",
                     "ratio": "accuracy vs keep ratio (hollow: published)", "layer": "accuracy vs pruning layer K"}[kind]
            fig.suptitle(f"{model}: {title}", fontsize=11)
            fig.tight_layout()
            path = plot_dir / f"{kind}_{model}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _samples(br) -> str:
    ns = sorted({r["n_samples"] for r in br if r.get("n_samples") is not None})
    if not ns:
        return "n = ?"
    if len(ns) == 1:
        return f"n = {ns[0]} sample{'s' if ns[0] != 1 else ''}"
    return f"n = {ns[0]}-{ns[-1]} samples"


def score_axis(ax, br, bench: str) -> None:
    """The y axis says what the score is (metric and scale, from SCORE_SPECS), the title the sample count;
    a score that cannot be negative gets no negative axis (0-100 scales end at 100)."""
    lmms = sorted({r["lmms_task"] for r in br if r.get("lmms_task")})
    spec = SCORE_SPECS.get(lmms[0]) if lmms else None
    if spec is not None:
        names, scale, unit = spec
        ylabel = f"{'+'.join(names)}{f' x{scale:g}' if scale != 1 else ''}: {unit}"
    else:
        ylabel = (br[0].get("score_metric") or "score") if br else "score"
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(f"{bench} ({_samples(br)})", fontsize=10)
    ys = [r["score"] for r in br if r.get("score") is not None] + [y for ln in ax.get_lines() for y in ln.get_ydata()]
    if ys and min(ys) >= 0:
        hi = ax.get_ylim()[1]
        if spec is not None and ("0-100" in spec[2] or "%" in spec[2]) and max(ys) <= 100:
            hi = 100.0  # the whole scale
        ax.set_ylim(0.0, hi if hi > 0 else 1.0)


def _bench_of(r):
    return (r.get("pub") or {}).get("benchmark") or r["benchmarks"][0]


def _label(r, vary_layer: bool, vary_start: bool) -> str:
    s = r["method"]
    if vary_layer and r["layer"] is not None:
        s += f" K={r['layer']}"
    if vary_start and r["start"] is not None:
        s += f" @{_fmt_key(r['start'])}"
    return s


def _lines(br, x_of, group_extra=()):
    """{label: [(x, y), ...]} over the non-baseline runs, latest run per point."""
    methods = {r["method"] for r in br}
    lines: dict[str, dict] = {}
    for m in sorted(methods - {"baseline"}):
        mr = [r for r in br if r["method"] == m]
        vary_layer = len({str(r["layer"]) for r in mr}) > 1 and "layer" not in group_extra
        vary_start = len({str(r["start"]) for r in mr}) > 1
        for r in sorted(mr, key=lambda r: r["mtime"]):
            x = x_of(r)
            if x is None:
                continue
            label = _label(r, vary_layer, vary_start)
            if "keep" in group_extra:
                label += f" keep {_fmt_key(r['keep_ratio'])}"
            lines.setdefault(label, {})[x] = r["score"]
    return {k: sorted(v.items()) for k, v in lines.items()}


def _baseline_line(ax, br):
    base = [r for r in br if r["method"] == "baseline"]
    if base:
        b = max(base, key=lambda r: r["mtime"])
        ax.axhline(b["score"], color="black", lw=1, ls=":", label="baseline")
        return b
    return None


def _plot_pareto(ax, br, pub_rows):
    pts = []
    for label, xy in _lines(br, lambda r: 100 * (r["flops_reduction"] or 0.0)).items():
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker="o", ms=4, lw=1, label=label)
        pts += list(xy)
    b = _baseline_line(ax, br)
    if b is not None:
        pts.append((0.0, b["score"]))
        ax.plot([0.0], [b["score"]], marker="s", color="black", ms=5)
    front, best = [], -math.inf
    for x, y in sorted(pts, key=lambda p: (-p[0], -p[1])):  # max reduction first; keep points that raise the best score
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        fx, fy = zip(*sorted(front))
        ax.plot(fx, fy, ls="--", color="gray", lw=1.2, label="Pareto front")
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)


def _plot_ratio(ax, br, pub_rows):
    lines = _lines(br, lambda r: r["keep_ratio"])
    for label, xy in lines.items():
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker="o", ms=4, lw=1, label=label)
    _baseline_line(ax, br)
    model_label = br[0]["model_label"]
    bench = _bench_of(br[0])
    methods = {r["method"] for r in br} - {"baseline"}
    starts = {r["start"] for r in br if r["method"] != "baseline"}
    for m in sorted(methods):
        pts = sorted({(p["keep_ratio"], p["score"]) for p in pub_rows
                      if p["model"] == model_label and p["benchmark"] == bench and p["method"] == m
                      and p["keep_ratio"] is not None and any(_eq_opt(s, p["start"]) for s in starts)})
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", mfc="none", ls=":", lw=1, label=f"{m} (published)")
    ax.set_xlabel("keep ratio (fraction of visual tokens kept)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)


def _layer_lines(br):
    return {k: v for k, v in _lines(br, lambda r: r["layer"] if isinstance(r["layer"], int) else None,
                                    group_extra=("layer", "keep")).items() if len(v) > 1}


def _plot_layer(ax, br, pub_rows):
    for label, xy in _layer_lines(br).items():
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker="o", ms=4, lw=1, label=label)
    _baseline_line(ax, br)
    ax.set_xlabel("pruning layer K (first layer that sees the pruned sequence)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
