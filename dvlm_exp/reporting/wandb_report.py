"""A W&B Report per sweep from the report's result (scripts/report.py --wandb-report), with wandb-workspaces.

`build_wandb_report` makes the Report object without any network call (tests/test_report.py checks the
spec it would save); `publish` saves it (online: wandb's own login, `wandb login` or WANDB_API_KEY).

Layout: one section per W&B group of the collected runs (the group dvlm_exp/run/wandb_log.py gave them: the
sweep's name, else the multirun's sweep dir; recorded in results.json `wandb.group`), holding
  - the report's tables of that group's runs as markdown, `ours / published (delta)` beside the published
    numbers, and the efficiency table (a `warning:` line where a table has no published match);
  - a panel grid with one run set per method (runs of the group carrying the method's tag, or its preset's
    tag: `method:<prune.name>` / `preset:<preset>`), so each method is its own colour, and two scatter
    plots of the run summaries: score (the paper's scale) vs FLOPs reduction, and vs latency per sample.
A run set names no project: it reads the report's own project (the one the runs were logged to).
"""

from __future__ import annotations

from collections import OrderedDict

SCATTERS = (("accuracy vs FLOPs reduction", "flops/reduction"),
            ("accuracy vs latency per sample (s)", "timing/latency_s_per_sample"))


def run_group(run: dict) -> str | None:
    """The W&B group of a collected run: the one it was logged under, else its sweep's name."""
    return run.get("wandb_group") or run.get("sweep")


def _method_tag(run: dict) -> str:
    return f"preset:{run['preset']}" if run.get("preset") and run["preset"] != run["prune"] else f"method:{run['prune']}"


def sections(result: dict) -> "OrderedDict[str, dict]":
    """{group: {"methods": {label: tag}, "tables": [table ids], "runs": n}} in the order the runs came."""
    out: OrderedDict[str, dict] = OrderedDict()
    by_dir = {r["run_dir"]: r for r in result["runs"]}
    for r in result["runs"]:
        g = run_group(r)
        if g is None:
            continue
        sec = out.setdefault(g, {"methods": OrderedDict(), "tables": [], "runs": 0})
        sec["runs"] += 1
        sec["methods"].setdefault(r["method"], _method_tag(r))
    for t in result["tables"]:
        for g in dict.fromkeys(run_group(by_dir[d]) for d in t["runs"] if d in by_dir):
            if g in out and t["id"] not in out[g]["tables"]:
                out[g]["tables"].append(t["id"])
    return out


def build_wandb_report(result: dict, project: str, entity: str, title: str = "dvlm_exp report"):
    """The wandb_workspaces Report (not saved: no network)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    from dvlm_exp.reporting.report.markdown import _display, _md_table, published_warnings

    if not entity:
        raise ValueError("a W&B report needs an entity (--wandb-entity, or wandb's default entity when online)")
    general, per_table = published_warnings(result)
    tables = {t["id"]: t for t in result["tables"]}
    blocks = [wr.P(f"{len(result['runs'])} runs from {', '.join(result['inputs'])}; published numbers: "
                   f"{result.get('published') or 'none'}. Cells: ours / published (ours - published) on the paper's "
                   "scale; score = the main metric on the paper's scale (W&B summary `score`).")]
    blocks += [wr.P(f"warning: {w}") for w in general]
    secs = sections(result)
    for group, sec in secs.items():
        blocks.append(wr.H2(f"sweep {group}"))
        for tid in sec["tables"]:
            t = tables[tid]
            blocks.append(wr.H3(f"{tid}: {t['info'].get('caption', '')}"))
            blocks += [wr.P(f"warning: {w}") for w in per_table.get(tid, [])]
            blocks.append(wr.MarkdownBlock(text=_md_table(*_display(t, "scores"))))
            blocks.append(wr.MarkdownBlock(text="Efficiency (F: our FLOPs change, t: our latency change, pub: the "
                                                "paper's time change):\n\n" + _md_table(*_display(t, "efficiency"))))
        runsets = [wr.Runset(name=label, filters=[expr.Metric("Group") == group, expr.Tags().isin([tag])])
                   for label, tag in sec["methods"].items()]
        panels = [wr.ScatterPlot(title=name, x=wr.SummaryMetric(x), y=wr.SummaryMetric("score"))
                  for name, x in SCATTERS]
        blocks.append(wr.PanelGrid(runsets=runsets, panels=panels))
    skipped = sum(1 for r in result["runs"] if run_group(r) is None)
    if skipped:
        blocks.append(wr.P(f"{skipped} runs were not logged to W&B in a group (no sweep, no multirun): not shown here."))
    return wr.Report(project=project, entity=entity, title=title,
                     description=f"{len(result['runs'])} runs, {len(secs)} sweeps", blocks=blocks)


def report_spec(report) -> dict:
    """What Report.save() sends: the view spec of `report._to_model()` (wandb-workspaces' save)."""
    import json

    model = report._to_model()
    return {"displayName": model.display_name, "description": model.description,
            "entityName": model.project.entity_name, "projectName": model.project.name,
            "spec": json.loads(model.spec.model_dump_json(by_alias=True, exclude_none=True))}


def publish(result: dict, project: str, entity: str | None = None) -> str:
    """Save the report online; returns its URL."""
    if not entity:
        import wandb

        entity = wandb.Api().default_entity
    report = build_wandb_report(result, project, entity)
    report.save()
    return report.url
