"""The entry: collect, match, lay out, plot and write one report."""

from __future__ import annotations

import json
from pathlib import Path
from dvlm_exp.reporting.report.collect import find_run_dirs, load_run
from dvlm_exp.reporting.report.markdown import _slug, render
from dvlm_exp.reporting.report.peers import _lend_tables, expand_readings
from dvlm_exp.reporting.report.plots import make_plots
from dvlm_exp.reporting.report.published import load_published
from dvlm_exp.reporting.report.tables import build_tables


# --------------------------------------------------------------------------------------------------
# Entry

def build_report(dirs, out, published=None, maps: dict | None = None, plots: bool = True) -> dict:
    """Collect, match, lay out, plot and render; returns the result (tables as DataFrames) and writes
    runs.csv, tables/*.csv, plots/*.png, report.md, report.html and summary.json under `out`."""
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = find_run_dirs(dirs)
    runs = []
    bad = 0
    for d in found["complete"]:
        try:
            runs.append(load_run(d, maps))
        except (KeyError, TypeError, ValueError, OSError):  # a record of another schema: counted as incomplete
            bad += 1
    pub_rows, tables = load_published(published) if published else ([], {})
    entries = expand_readings(runs, pub_rows)
    built = build_tables(entries, pub_rows, tables)
    _lend_tables(runs, entries)
    (out / "tables").mkdir(exist_ok=True)
    for t in built:
        t["scores"].to_csv(out / "tables" / f"{_slug(t['id'])}.csv", index=False)
        t["efficiency"].to_csv(out / "tables" / f"{_slug(t['id'])}_efficiency.csv", index=False)
    runs_df = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items() if k != "pub"}
                            | {"published": (r.get("pub") or {}).get("score"),
                               "published_table": (r.get("pub") or {}).get("table_id")} for r in runs])
    runs_df.to_csv(out / "runs.csv", index=False)
    plot_paths = make_plots(runs, pub_rows, out / "plots") if plots and runs else []
    result = {
        "inputs": [str(d) for d in dirs],
        "published": str(published) if published else None,
        "maps": maps or {},
        "counts": {"complete": len(runs), "failed": len(found["failed"]), "incomplete": len(found["incomplete"]) + bad,
                   "unscored": sum(1 for r in runs if r["score"] is None),
                   "superseded": sum(t["superseded"] for t in built)},
        "tables": built,
        "plots": [str(p) for p in plot_paths],
        "runs": runs,
    }
    md_path, html_path = render(result, out)
    result["summary"] = {
        "out": str(out), "report_md": str(md_path), "report_html": str(html_path),
        "runs": len(runs), "skipped": {"failed": len(found["failed"]), "incomplete": len(found["incomplete"]) + bad},
        "unscored": result["counts"]["unscored"], "superseded": result["counts"]["superseded"],
        "tables": [{"id": t["id"], "rows": len(t["scores"]), "benchmarks": t["benchmarks"],
                    "ours_cells": t["ours_cells"], "matched_cells": t["matched_cells"]} for t in built],
        "plots": [Path(p).name for p in plot_paths], "published": result["published"],
        "warnings": result["warnings"],
    }
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2))
    return result
