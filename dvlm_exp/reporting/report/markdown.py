"""report.md (markdown tables, the name mapping, warnings) and the call to the HTML renderer."""

from __future__ import annotations

import math
from pathlib import Path
from dvlm_exp.reporting.report.labels import BENCHMARK_LABELS, METHOD_LABELS, MODEL_LABELS, SCORE_SPECS
from dvlm_exp.reporting.report.tables import _fmt_num


# --------------------------------------------------------------------------------------------------
# Rendering

def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _display(t: dict, which: str) -> tuple[list[str], list[list[str]]]:
    df = t["scores"] if which == "scores" else t["efficiency"]
    header = list(t["key_cols"]) + list(t["benchmarks"])
    rows = []
    for _, r in df.iterrows():
        row = [str(r[k]) for k in t["key_cols"]]
        for b in t["benchmarks"]:
            if which == "scores":
                o, p, d = r[f"{b}|ours"], r[f"{b}|published"], r[f"{b}|delta"]
                parts = [_fmt_num(o) or "·"]
                if _present(p):
                    parts.append(f"/ {_fmt_num(p)}")
                if _present(d):
                    parts.append(f"({_fmt_num(d, signed=True)})")
                row.append(" ".join(parts) if (_present(o) or _present(p)) else "")
            else:
                f, tc, tp = r[f"{b}|flops_red_pct"], r[f"{b}|time_change_pct"], r[f"{b}|time_change_pct_published"]
                parts = []
                if _present(f):
                    parts.append(f"{_fmt_num(-f, signed=True)}% F")
                if _present(tc):
                    parts.append(f"{_fmt_num(tc, signed=True)}% t")
                if _present(tp):
                    parts.append(f"[pub {_fmt_num(tp, signed=True)}% t]")
                row.append(" ".join(parts))
        rows.append(row)
    return header, rows


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


MAPPING_NOTE = ("Keep ratio: `ratio` (fraction of visual tokens kept); `none` = 1, `vtw` = 0 (all withdrawn), "
                "visipruner / skip: none (adaptive / nothing removed). Start: `first_step` = step0, "
                "`start_frac` / `late_step` = the fraction, `at_step` = step<s>, no pruning = -. Layer: prune.layer "
                "(sparsevlm: its layers); a published row without a layer matches any.")


def mapping_data(maps: dict | None = None) -> list[dict]:
    """The name mapping as tables: [{"title", "header", "rows"}] (report.md and report.html)."""
    maps = maps or {}
    return [
        {"title": "models", "header": ["model", "paper label"],
         "rows": [[k, v] for k, v in {**MODEL_LABELS, **maps.get("model", {})}.items()]},
        {"title": "methods", "header": ["prune preset / name", "paper method"],
         "rows": [[k, v] for k, v in {**METHOD_LABELS, **maps.get("method", {})}.items()]},
        {"title": "benchmarks", "header": ["task preset", "paper benchmark label(s)"],
         "rows": [[k, " or ".join(v)] for k, v in {**BENCHMARK_LABELS, **{k: [v] for k, v in maps.get("task", {}).items()}}.items()]},
        {"title": "scores", "header": ["lmms-eval task", "score on the paper's scale"],
         "rows": [[k, f"{' + '.join(m)} x {s:g} ({u})"] for k, (m, s, u) in SCORE_SPECS.items()]},
    ]


def mapping_tables(maps: dict | None = None) -> str:
    parts = ["### Name mapping (ours -> published.yaml)", ""]
    for m in mapping_data(maps):
        parts += [_md_table(m["header"], m["rows"]), ""]
    return "\n".join(parts + [MAPPING_NOTE])


def published_warnings(result: dict) -> tuple[list[str], dict[str, list[str]]]:
    """(report-wide warnings, {table id: warnings}): no published file at all, or a table none of whose
    cells of ours has a published value beside it."""
    general, per_table = [], {}
    if not result.get("published"):
        general.append("no published numbers were read (`--published none`): every table shows ours only")
    for t in result["tables"]:
        if result.get("published") and t["ours_cells"] and not t["matched_cells"]:
            per_table[t["id"]] = [
                f"table {t['id']}: none of its {t['ours_cells']} cells of ours has a published match in "
                f"{result['published']} (model / method / keep ratio / start / layer / benchmark differ; "
                f"`--map kind:ours=theirs` maps our names onto the paper's): ours only"]
    return general, per_table


def render(result: dict, out: Path) -> tuple[Path, Path]:
    from dvlm_exp.reporting.render import render_html

    c = result["counts"]
    intro = [
        f"Inputs: {', '.join(result['inputs'])}",
        f"Runs: {c['complete']} complete collected; skipped {c['failed']} failed and {c['incomplete']} incomplete; "
        f"{c['unscored']} complete but unscored (predict-only: score them with scripts/judge.py); "
        f"{c['superseded']} superseded by a later run of the same cell.",
        f"Published: {result['published'] or 'none'}",
        "Cells: `ours / published (ours - published)` on the paper's scale; `layer` is the paper's (- = not stated; "
        "our layers are in runs.csv). Efficiency cells: our FLOPs change (`F`, exact convention, = -reduction), our "
        "latency change per sample vs our baseline run (`t`), the paper's time change (`pub`, whole benchmark run, "
        "its hardware).",
    ]
    general, per_table = published_warnings(result)
    result["warnings"] = general + [w for t in result["tables"] for w in per_table.get(t["id"], [])]
    md = ["# dvlm_exp report", ""] + [ln + "  " for ln in intro] + [""] + [f"> warning: {w}" for w in general]
    md += [""] if general else []
    html_tables = []
    for t in result["tables"]:
        info = t["info"]
        title = f"{t['id']}: {info.get('caption', '')}"
        sub = f"{info.get('title', '')}" + (f" (arXiv {info['arxiv']})" if info.get("arxiv") else "")
        score_h, score_rows = _display(t, "scores")
        eff_h, eff_rows = _display(t, "efficiency")
        csv = (f"tables/{_slug(t['id'])}.csv", f"tables/{_slug(t['id'])}_efficiency.csv")
        warns = per_table.get(t["id"], [])
        md += [f"## {title}", "", sub, ""] + [f"> warning: {w}\n" for w in warns] + [
            _md_table(score_h, score_rows), "", "Efficiency:", "",
            _md_table(eff_h, eff_rows), "", f"CSV: {csv[0]}, {csv[1]}", ""]
        html_tables.append({"title": title, "sub": sub, "warnings": warns, "scores": (score_h, score_rows),
                            "efficiency": (eff_h, eff_rows), "n_key": len(t["key_cols"]), "csv": csv})
    plots = []
    if result["plots"]:
        md += ["## Plots", ""]
        for p in result["plots"]:
            rel = Path(p).relative_to(out).as_posix()
            md += [f"![{Path(p).stem}]({rel})", ""]
            plots.append({"src": rel, "alt": Path(p).stem})
    md += [mapping_tables(result.get("maps")), ""]
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text(render_html("dvlm_exp report", intro, general, html_tables, plots,
                                     mapping_data(result.get("maps")), MAPPING_NOTE))
    return md_path, html_path


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
