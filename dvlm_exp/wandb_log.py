"""W&B mirror of results.json. Offline (files under the run dir) when no API key is set.

`wandb.finish()` always runs (finally block in the runner), so jobs of a multirun in one
process never leak into each other.

Grouping and naming (the same for every sweep, so runs compare across sweeps in one project):
  group  logger.group when set; else the sweep's name (`+sweep=<name>`, sweeps/sweep/<name>.yaml: cfg.sweep.name);
         else, in a multirun, the Hydra sweep dir (hydra.sweep.dir as configured); else none
  name   logger.name_ when set; else, in a multirun, "<job num>_<override dirname>" (the run dir's name)
  tags   model:<model.name> method:<prune.name> task:<task.name> schedule:<schedule.name>, plus
         preset:<prune preset> when the prune preset is not named after the method (llada_fastv, study_fastv),
         sweep:<name> for a sweep, and logger.tags
Summary keys (`summary_metrics`): score (main metric on the paper's scale, dvlm_exp.report.main_score) and
score_metric (what it is), keep_ratio / prune_start / prune_layer (the report's keys), metric/<name> (every
numeric lmms-eval metric, task-independent names), <lmms task>/<name> (lmms-eval's own naming), and
flops/*, tokens/* (+ tokens/kept_fraction), timing/*, memory/*, loyalty/* from results.json.
"""

from __future__ import annotations

import os
from pathlib import Path


def flat(prefix: str, d: dict, out: dict) -> dict:
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat(key, v, out)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def samples_table(predictions: list[dict]):
    """Per-sample predictions as a wandb.Table: the union of the rows' keys as columns, nested values
    (metric items such as {"score": ..., "review": ...}, answer lists) as JSON text. wandb infers a
    column type from the rows and rejects a table whose rows disagree (a judge score null in one row
    and a number in the next), which would fail the run after all samples were generated.

    The rows are our own predictions (runner.build_record), not lmms-eval's `samples`, and nothing here
    mutates them: lmms-eval's `EvaluationTracker.save_results_samples` pops `arguments`/`doc` from the
    sample dicts it is given (ecosystem.md §5.1), but the runner never uses EvaluationTracker."""
    import json

    import wandb

    cols: list[str] = []
    for p in predictions:
        cols += [k for k in p if k not in cols]

    def kind(v):
        return "bool" if isinstance(v, bool) else "num" if isinstance(v, (int, float)) else "str" if isinstance(v, str) else "json"

    # a column keeps its plain values only when all rows agree on one scalar kind; otherwise JSON text
    kinds = {c: {kind(p[c]) for p in predictions if p.get(c) is not None} for c in cols}
    plain = {c for c in cols if len(kinds[c]) <= 1 and "json" not in kinds[c]}

    def cell(c, v):
        if v is None or c in plain:
            return v
        return json.dumps(v, default=str)

    return wandb.Table(columns=cols, data=[[cell(c, p.get(c)) for c in cols] for p in predictions])


def hydra_context() -> dict:
    """What the running Hydra job says about itself ({} outside a Hydra app, e.g. tests and lmms-eval's CLI)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        return {
            "multirun": hc.mode == RunMode.MULTIRUN,
            "sweep_dir": str(hc.sweep.dir),
            "job_num": hc.job.get("num"),
            "override_dirname": hc.job.get("override_dirname") or "",
            "choices": dict(hc.runtime.choices),
        }
    except Exception:  # noqa: BLE001 - naming must never fail a run
        return {}


def _fit(s: str, n: int = 128) -> str:
    return s if len(s) <= n else s[-n:]  # W&B caps group / name length: keep the distinctive tail


def resolve_group(cfg, hctx: dict | None = None) -> str | None:
    hctx = hydra_context() if hctx is None else hctx
    lc = cfg.logger
    if lc.get("group"):
        return str(lc.group)
    sweep = cfg.get("sweep")
    if sweep is not None and sweep.get("name"):
        return str(sweep.name)
    if hctx.get("multirun") and hctx.get("sweep_dir"):
        return _fit(hctx["sweep_dir"])
    return None


def resolve_name(cfg, hctx: dict | None = None) -> str | None:
    hctx = hydra_context() if hctx is None else hctx
    if cfg.logger.get("name_"):
        return str(cfg.logger.name_)
    if hctx.get("multirun"):
        head = f"{hctx.get('job_num')}_"
        return head + _fit(hctx.get("override_dirname") or "", 128 - len(head))
    return None


def run_tags(cfg, hctx: dict | None = None) -> list[str]:
    hctx = hydra_context() if hctx is None else hctx
    tags = [f"model:{cfg.model.name}", f"method:{cfg.prune.name}", f"task:{cfg.task.name}",
            f"schedule:{cfg.schedule.name}"]
    preset = (hctx.get("choices") or {}).get("prune")
    if preset and preset != cfg.prune.name:
        tags.append(f"preset:{preset}")
    sweep = cfg.get("sweep")
    if sweep is not None and sweep.get("name"):
        tags.append(f"sweep:{sweep.name}")
    tags += [str(t) for t in (cfg.logger.get("tags") or [])]
    return [t[:64] for t in tags]  # W&B's tag length limit


def summary_metrics(record: dict) -> dict:
    """The run summary: the same key names for every task and sweep (module docstring)."""
    from dvlm_exp.report import main_score, prune_layer, prune_start
    from dvlm_exp.report import keep_ratio as nominal_keep

    summary: dict = {}
    score, what = main_score(record)
    summary["score"] = score
    summary["score_metric"] = what
    cfg = record.get("config") or {}
    if cfg.get("prune"):
        summary["keep_ratio"] = nominal_keep(cfg)
        start = prune_start(cfg)
        summary["prune_start"] = start if start is None or isinstance(start, float) else str(start)
        layer = prune_layer(cfg)
        summary["prune_layer"] = layer if layer is None or isinstance(layer, int) else str(layer)
    task = record["task"]
    for k, v in record["metrics"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            name = k.split(",")[0]
            summary[f"metric/{name}"] = v
            summary[f"{task}/{name}"] = v
    for section in ("flops", "tokens", "timing", "memory", "loyalty"):
        if isinstance(record.get(section), dict):
            flat(section, {k: v for k, v in record[section].items() if not isinstance(v, list)}, summary)
    tok = record.get("tokens") or {}
    vis = tok.get("visual_per_sample") or []
    if vis and sum(vis):
        summary["tokens/kept_fraction"] = tok.get("visual_kept_avg", 0.0) / (sum(vis) / len(vis))
    return summary


class WandbSink:
    def __init__(self, cfg, resolved: dict, run_dir: Path):
        import wandb

        lc = cfg.logger
        mode = lc.get("mode") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        hctx = hydra_context()
        self.group = resolve_group(cfg, hctx)
        self.tags = run_tags(cfg, hctx)
        self.run = wandb.init(
            project=lc.get("project", "dvlm_exp"), entity=lc.get("entity"), group=self.group,
            name=resolve_name(cfg, hctx), job_type=lc.get("job_type"), config=resolved, dir=str(run_dir),
            mode=mode, tags=self.tags, reinit="create_new",
        )
        self.mode = mode

    def log_record(self, record: dict, predictions: list[dict]) -> None:
        summary = summary_metrics(record)
        task = record["task"]
        self.run.summary.update(summary)
        self.run.log({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if predictions:
            self.run.log({f"{task}/samples": samples_table(predictions)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
