"""Aggregation of the probes' records: per (step, layer) means over heads, query rows and samples."""

from __future__ import annotations

import math

import numpy as np

from dvlm_exp.analysis.probes import CONF_FIELDS, CONTRIB_FIELDS, KEY_TYPES, QUERY_GROUPS, _segments, kept_at


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
