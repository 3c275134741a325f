"""The papers' tables: rows = model x method x keep ratio (x start, x layer), columns = benchmarks, cells = ours / published / delta; the efficiency table."""

from __future__ import annotations

import math
from pathlib import Path
from dvlm_exp.reporting.report.labels import AVG_LABEL
from dvlm_exp.reporting.report.published import _eq_opt, matches


# --------------------------------------------------------------------------------------------------
# Tables

def _fmt_key(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_num(v, signed=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    v = float(v) + 0.0  # no "-0.00"
    s = f"{v:+.2f}" if abs(v) < 10 else f"{v:+.1f}"
    if s in ("-0.00", "+0.00"):
        s = "+0.00"
    return s if signed else s.lstrip("+")


def assign_tables(runs: list[dict], pub_rows: list[dict], tables: dict) -> dict:
    """Adds run["table_id"] and run["pub"] (the matched published row of that table, or None).
    A run goes to its sweep's table (sweep.paper / sweep.table) when published.yaml has it, else to the
    first published table with a matching row, else to the published table of its multirun siblings (same
    parent dir and model), else to "<paper or runs>/<sweep or model>" (ours only).
    Baseline runs are also shown in every other table of the same model (build_tables)."""
    for run in runs:
        cands = [p for p in pub_rows if matches(run, p)]
        tid = None
        if run.get("paper") and run.get("table"):
            want = f"{run['paper']}/{run['table']}"
            if want in tables:
                tid = want
                cands = [p for p in cands if p["table_id"] == want]
        if tid is None and cands:
            tid = cands[0]["table_id"]
            cands = [p for p in cands if p["table_id"] == tid]
        run["table_id"] = tid
        run["pub"] = cands[0] if cands else None
    # a run no published row describes, outside a paper sweep, joins the published table its multirun
    # siblings (same parent dir, same model) went to; else a table of its own sweep / model
    for run in runs:
        if run["table_id"] is not None:
            continue
        parent = str(Path(run["run_dir"]).parent)
        sib = [r["table_id"] for r in runs if r["table_id"] in tables and r["model"] == run["model"]
               and str(Path(r["run_dir"]).parent) == parent and r["method"] != "baseline"]
        run["table_id"] = (max(set(sib), key=sib.count) if sib
                           else f"{run.get('paper') or 'runs'}/{run.get('sweep') or run['model']}")
    return {r["run_dir"]: r["table_id"] for r in runs}


def build_tables(runs: list[dict], pub_rows: list[dict], tables: dict) -> list[dict]:
    """Per table: {"id", "info", "key_cols", "benchmarks", "scores" (DataFrame), "efficiency" (DataFrame), ...}.
    scores columns: key_cols + "<benchmark>|ours", "|published", "|delta"; efficiency: "<benchmark>|flops_red_pct",
    "|time_change_pct", "|time_change_pct_published". Baseline runs appear in every table of their model (in
    the columns that table has) and make a table of their own only when their model has no other."""
    import pandas as pd

    assign_tables(runs, pub_rows, tables)
    baselines = [r for r in runs if r["method"] == "baseline"]
    pruned = [r for r in runs if r["method"] != "baseline"]
    models_with_tables = {r["model_label"] for r in pruned}
    tids: list[str] = []
    for r in pruned + [b for b in baselines if b["model_label"] not in models_with_tables]:
        if r["table_id"] not in tids:
            tids.append(r["table_id"])
    out = []
    for tid in tids:
        info = tables.get(tid) or {"paper": tid.split("/")[0], "table": tid.split("/", 1)[1], "title": "",
                                   "caption": "our runs (no published table)", "arxiv": None, "benchmarks": []}
        members = [r for r in pruned if r["table_id"] == tid]
        if not members:  # a baseline-only table
            members = [b for b in baselines if b["table_id"] == tid]
        models = {r["model_label"] for r in members}
        # baselines of this table's models; where the table has pruned runs of the task, only a baseline
        # with their generation preset (chartqa: the study's 8 steps vs the official 16); the best one last
        gens = {(r["model"], r["task"]): {x["gen"] for x in members if (x["model"], x["task"]) == (r["model"], r["task"])}
                for r in members}
        base_members = sorted(
            (b for b in baselines if b["model_label"] in models and b not in members
             and b["gen"] in gens.get((b["model"], b["task"]), {b["gen"]})),
            key=lambda b: (b.get("paper") == info["paper"], b["mtime"]))
        pubs = [p for p in pub_rows if p["table_id"] == tid and p["model"] in models]
        with_layer = tid not in tables or any(p["layer"] is not None for p in pubs)
        key_cols = ["model", "method", "keep_ratio", "start"] + (["layer"] if with_layer else [])
        bench_order = [b for b in info["benchmarks"] if any(p["benchmark"] == b for p in pubs)]

        def rowkey(model, method, keep, start, layer):
            k = (model, method, _fmt_key(keep), _fmt_key(start))
            return k + ((_fmt_key(layer),) if with_layer else ())

        cells: dict[tuple, dict] = {}
        for p in pubs:
            c = cells.setdefault(rowkey(p["model"], p["method"], p["keep_ratio"], p["start"], p["layer"]) + (p["benchmark"],), {})
            c.update(published=p["score"], time_change_pct_published=p["time_change_pct"], keep=p["keep_ratio"])
        superseded = 0
        for group, add_columns in ((sorted(members, key=lambda r: r["mtime"]), True), (base_members, False)):
            for r in group:
                if r["score"] is None:
                    continue
                bench = next((b for b in r["benchmarks"] if b in bench_order), None)
                if bench is None:
                    if not add_columns:
                        continue  # a baseline of a benchmark this table does not show
                    bench = r["benchmarks"][0]
                    bench_order.append(bench)
                key = rowkey(r["model_label"], r["method"], r["keep_ratio"], r["start"], _row_layer(r, pubs)) + (bench,)
                c = cells.setdefault(key, {})
                superseded += "ours" in c
                c.update(ours=r["score"], run_dir=r["run_dir"], keep=r["keep_ratio"],
                         flops_red_pct=None if r["flops_reduction"] is None else 100 * r["flops_reduction"],
                         time_change_pct=_time_change(r, baselines))
        order = {m: i for i, m in enumerate(dict.fromkeys(p["method"] for p in pubs))}  # the paper's row order
        rows = sorted({k[:-1] for k in cells}, key=lambda k: _row_sort(k, cells, order))
        if AVG_LABEL in bench_order:  # ours: mean of score / our baseline's score over the row's benchmarks
            bench_order.remove(AVG_LABEL)
            bench_order.append(AVG_LABEL)
            _fill_avg(rows, cells, bench_order, with_layer)
        score_recs, eff_recs = [], []
        for row in rows:
            s, e = dict(zip(key_cols, row)), dict(zip(key_cols, row))
            for b in bench_order:
                c = cells.get(row + (b,), {})
                ours, pub = c.get("ours"), c.get("published")
                s[f"{b}|ours"], s[f"{b}|published"] = ours, pub
                s[f"{b}|delta"] = (ours - pub) if ours is not None and pub is not None else None
                e[f"{b}|flops_red_pct"] = c.get("flops_red_pct")
                e[f"{b}|time_change_pct"] = c.get("time_change_pct")
                e[f"{b}|time_change_pct_published"] = c.get("time_change_pct_published")
            score_recs.append(s)
            eff_recs.append(e)
        scores = pd.DataFrame(score_recs, columns=key_cols + [f"{b}|{x}" for b in bench_order for x in ("ours", "published", "delta")])
        eff = pd.DataFrame(eff_recs, columns=key_cols + [f"{b}|{x}" for b in bench_order
                                                          for x in ("flops_red_pct", "time_change_pct", "time_change_pct_published")])
        ours_cells = [c for c in cells.values() if "run_dir" in c]
        out.append({"id": tid, "info": info, "key_cols": key_cols, "benchmarks": bench_order, "scores": scores,
                    "efficiency": eff, "runs": [m["run_dir"] for m in members + base_members],
                    "ours_cells": len(ours_cells),
                    "matched_cells": sum(1 for c in ours_cells if c.get("published") is not None),
                    "superseded": superseded})
    return out


def _row_layer(run: dict, pubs: list[dict]):
    """The layer of the table row a run lands on: its own, unless the paper has the row (same model, method,
    keep, start) without a layer and none at the run's layer: then the paper's row (layer not stated)."""
    same = [p for p in pubs if p["model"] == run["model_label"] and p["method"] == run["method"]
            and _eq_opt(run["keep_ratio"], p["keep_ratio"]) and _eq_opt(run["start"], p["start"])]
    if any(p["layer"] is not None and str(p["layer"]) == str(run["layer"]) for p in same):
        return run["layer"]
    if any(p["layer"] is None for p in same):
        return None
    return run["layer"]


def _row_sort(k, cells, order):
    keep = max((c["keep"] for kk, c in cells.items() if kk[:-1] == k and c.get("keep") is not None), default=-1.0)
    return (k[0], k[1] != "baseline", -keep if k[1] in order else 0, order.get(k[1], len(order)), k[1],
            -keep, tuple(_natural(x) for x in k[3:]))


def _natural(x: str):
    try:
        return (0, float(x), "")
    except ValueError:
        return (1, 0.0, x)


def _time_change(run: dict, baselines: list[dict]):
    """Our latency per sample vs the latest baseline run of the same model, task and generation preset, in %."""
    if run["method"] == "baseline":
        return 0.0
    cands = [b for b in baselines if b["model"] == run["model"] and b["task"] == run["task"]
             and b["lmms_task"] == run["lmms_task"] and b["gen"] == run["gen"] and b["latency_s"]]
    same_n = [b for b in cands if b["n_samples"] == run["n_samples"]]
    cands = same_n or cands
    if not cands or run["latency_s"] is None:
        return None
    base = max(cands, key=lambda b: b["mtime"])
    return 100.0 * (run["latency_s"] / base["latency_s"] - 1.0)


def _fill_avg(rows, cells, bench_order, with_layer: bool):
    """Ours for the "Avg (relative %)" column: mean over the row's benchmarks of score / our baseline's score,
    x100, over the benchmarks the paper averaged for that row (those with a published value), or, for a row
    the paper does not have, over every benchmark our baseline has; empty when one of them is missing."""
    benches = [b for b in bench_order if b != AVG_LABEL]
    for row in rows:
        base_row = (row[0], "baseline", "1", "-") + (("-",) if with_layer else ())
        need = [b for b in benches if cells.get(row + (b,), {}).get("published") is not None] or \
               [b for b in benches if cells.get(base_row + (b,), {}).get("ours") is not None]
        vals = []
        for b in need:
            o, base = cells.get(row + (b,), {}).get("ours"), cells.get(base_row + (b,), {}).get("ours")
            if o is None or not base:
                vals = []
                break
            vals.append(o / base)
        if vals:
            cells.setdefault(row + (AVG_LABEL,), {})["ours"] = 100.0 * sum(vals) / len(vals)
