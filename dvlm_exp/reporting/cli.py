"""Tables and plots in the papers' layout from the results.json files of one or more sweeps.

    python scripts/report.py outputs/sweeps                                  # -> outputs/sweeps/report/
    python scripts/report.py outputs/sweeps/study_table1 outputs/sweeps/llada_v_baseline --out /tmp/rep
    python scripts/report.py outputs/multirun/2026-01-01/12-00-00 --map model:tiny=LLaDA-V --map task:synth_docvqa=DocVQA

Collects every complete run (results.json + .dvlm_complete) under the given directories (failed and
incomplete job dirs are skipped and counted), matches them to dvlm_exp/reporting/published.yaml
(--published, $DVLM_PUBLISHED; --published none: ours only) by (model, method, keep ratio, prune start,
layer, benchmark) with the name mapping of dvlm_exp/reporting/report/ (docs/report.md; `--map kind:ours=theirs`,
kind = model | method | task, adds to it), and writes under --out (default: <first dir>/report):
report.md, report.html, runs.csv, tables/<table>.csv (+ _efficiency.csv), plots/*.png, summary.json.
The last stdout line is the JSON summary. --wandb-report also saves a W&B Report per sweep
(dvlm_exp/reporting/wandb_report.py, wandb-workspaces; wandb's own login, skipped with a note without one);
--wandb-report-spec FILE writes what it would save, offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path



def parse_maps(items: list[str]) -> dict:
    maps: dict[str, dict] = {}
    for item in items or []:
        kind, sep, rest = item.partition(":")
        ours, eq, theirs = rest.partition("=")
        if not sep or not eq or kind not in ("model", "method", "task") or not ours or not theirs:
            raise SystemExit(f"error: --map {item!r}: expected model|method|task:<ours>=<paper label>")
        maps.setdefault(kind, {})[ours] = theirs
    return maps


def wandb_outputs(args, res) -> dict:
    """--wandb-report-spec: the W&B Report's spec as it would be saved (offline); --wandb-report: save it
    (online, with wandb's own login: `wandb login` or WANDB_API_KEY)."""
    from dvlm_exp.reporting import wandb_report
    from dvlm_exp.run.wandb_log import DEFAULT_BASE_URL, credentials, wandb_settings

    out = {}
    entity = args.wandb_entity or os.environ.get("WANDB_ENTITY")
    if args.wandb_report_spec:
        if not entity:
            raise SystemExit("error: --wandb-report-spec needs an entity: --wandb-entity <entity> (or WANDB_ENTITY)")
        spec = wandb_report.report_spec(wandb_report.build_wandb_report(res, args.wandb_project, entity))
        Path(args.wandb_report_spec).write_text(json.dumps(spec, indent=1))
        out["wandb_report_spec"] = str(args.wandb_report_spec)
        print(f"W&B report spec: {args.wandb_report_spec} ({len(spec['spec']['blocks'])} blocks, "
              f"{len(wandb_report.sections(res))} sweeps)")
    if args.wandb_report:
        ws = wandb_settings()
        base_url = ws.get("base_url") or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
        if credentials(base_url) is None and not ws.get("api_key"):
            out["wandb_report"] = "skipped: wandb has no credentials (run `wandb login` or set WANDB_API_KEY)"
        else:
            try:
                out["wandb_report"] = wandb_report.publish(res, args.wandb_project, entity)
            except Exception as e:  # noqa: BLE001 - the offline report is already written
                out["wandb_report"] = f"failed: {type(e).__name__}: {e}"
        print(f"W&B report: {out['wandb_report']}")
    return out


def main(argv: list[str] | None = None) -> int:
    from dvlm_exp.reporting import report

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="sweep dirs (or any dirs) holding run dirs with results.json")
    ap.add_argument("--out", help="output dir (default: <first dir>/report)")
    ap.add_argument("--published", help="published.yaml (default: $DVLM_PUBLISHED or dvlm_exp/reporting/published.yaml); 'none': ours only")
    ap.add_argument("--map", action="append", default=[], metavar="KIND:OURS=THEIRS",
                    help="extra name mapping, e.g. model:tiny=LLaDA-V, task:synth_docvqa=DocVQA, method:random=Random")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--wandb-report", action="store_true",
                    help="also save a W&B Report per sweep (online, wandb's login: `wandb login` or WANDB_API_KEY)")
    ap.add_argument("--wandb-report-spec", metavar="FILE",
                    help="write the W&B Report's spec (what --wandb-report would save) as JSON; offline")
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
    if args.wandb_report or args.wandb_report_spec:
        s.update(wandb_outputs(args, res))
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
