#!/usr/bin/env python
"""Tables and plots in the papers' layout from the results.json files of one or more sweeps.

    python scripts/report.py outputs/sweeps                                  # -> outputs/sweeps/report/
    python scripts/report.py outputs/sweeps/study_table1 outputs/sweeps/llada_v_baseline --out /tmp/rep
    python scripts/report.py outputs/multirun/2026-01-01/12-00-00 --map model:tiny=LLaDA-V --map task:synth_docvqa=DocVQA

Collects every complete run (results.json + .dvlm_complete) under the given directories (failed and
incomplete job dirs are skipped and counted), matches them to dvlm_exp/published.yaml
(--published, $DVLM_PUBLISHED; --published none: ours only) by (model, method, keep ratio, prune start,
layer, benchmark) with the name mapping of dvlm_exp/report.py (docs/report.md; `--map kind:ours=theirs`,
kind = model | method | task, adds to it), and writes under --out (default: <first dir>/report):
report.md, report.html, runs.csv, tables/<table>.csv (+ _efficiency.csv), plots/*.png, summary.json.
The last stdout line is the JSON summary. --wandb-report also publishes a W&B Report (needs
WANDB_API_KEY and `pip install wandb-workspaces`; skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # allow running from a checkout without `pip install -e .`
    sys.path.insert(0, str(_REPO))
from dvlm_exp._venv import use_project_venv  # noqa: E402

use_project_venv()


def parse_maps(items: list[str]) -> dict:
    maps: dict[str, dict] = {}
    for item in items or []:
        kind, sep, rest = item.partition(":")
        ours, eq, theirs = rest.partition("=")
        if not sep or not eq or kind not in ("model", "method", "task") or not ours or not theirs:
            raise SystemExit(f"error: --map {item!r}: expected model|method|task:<ours>=<paper label>")
        maps.setdefault(kind, {})[ours] = theirs
    return maps


def main(argv: list[str] | None = None) -> int:
    from dvlm_exp import report

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="sweep dirs (or any dirs) holding run dirs with results.json")
    ap.add_argument("--out", help="output dir (default: <first dir>/report)")
    ap.add_argument("--published", help="published.yaml (default: $DVLM_PUBLISHED or dvlm_exp/published.yaml); 'none': ours only")
    ap.add_argument("--map", action="append", default=[], metavar="KIND:OURS=THEIRS",
                    help="extra name mapping, e.g. model:tiny=LLaDA-V, task:synth_docvqa=DocVQA, method:random=Random")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--wandb-report", action="store_true", help="also publish a W&B Report (online; optional package)")
    ap.add_argument("--wandb-project", default="dvlm_exp")
    ap.add_argument("--wandb-entity", default=None)
    args = ap.parse_args(argv)

    for d in args.dirs:
        if not Path(d).is_dir():
            print(f"error: {d} is not a directory", file=sys.stderr)
            return 2
    if args.published == "none":
        published = None
    else:
        published = Path(args.published) if args.published else report.published_default()
        if published is not None and not published.is_file():
            print(f"error: --published {published} is not a file", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    res = report.build_report(args.dirs, out, published=published, maps=parse_maps(args.map), plots=not args.no_plots)
    s = res["summary"]
    print(f"collected {s['runs']} complete runs; skipped {s['skipped']['failed']} failed, "
          f"{s['skipped']['incomplete']} incomplete; {s['unscored']} unscored (predict-only)")
    for t in s["tables"]:
        print(f"  {t['id']}: {t['rows']} rows x {len(t['benchmarks'])} benchmarks, {t['ours_cells']} cells of ours, "
              f"{t['matched_cells']} with a published value")
    for w in s["warnings"]:  # no published numbers, or a table without one published match (also in the report)
        print(f"warning: {w}", file=sys.stderr)
    print(f"report: {s['report_md']} / {s['report_html']}")
    if args.wandb_report:
        if not os.environ.get("WANDB_API_KEY"):
            s["wandb_report"] = "skipped: WANDB_API_KEY is not set"
        else:
            try:
                s["wandb_report"] = report.publish_wandb_report(res, args.wandb_project, args.wandb_entity)
            except ImportError:
                s["wandb_report"] = "skipped: pip install wandb-workspaces"
            except Exception as e:  # noqa: BLE001 - the offline report is already written
                s["wandb_report"] = f"failed: {type(e).__name__}: {e}"
        print(f"W&B report: {s['wandb_report']}")
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
