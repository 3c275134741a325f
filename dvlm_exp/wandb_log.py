"""W&B mirror of results.json. Offline (files under the run dir) when no API key is set.

`wandb.finish()` always runs (finally block in the runner), so jobs of a multirun in one
process never leak into each other.
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


class WandbSink:
    def __init__(self, cfg, resolved: dict, run_dir: Path):
        import wandb

        lc = cfg.logger
        mode = lc.get("mode") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        tags = [f"model:{cfg.model.name}", f"prune:{cfg.prune.name}", f"task:{cfg.task.name}"]
        self.run = wandb.init(
            project=lc.get("project", "dvlm_exp"), entity=lc.get("entity"), group=lc.get("group"),
            name=lc.get("name_"), config=resolved, dir=str(run_dir), mode=mode, tags=tags,
            reinit="create_new",
        )
        self.mode = mode

    def log_record(self, record: dict, predictions: list[dict]) -> None:
        import wandb

        summary = {}
        task = record["task"]
        for k, v in record["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                summary[f"{task}/{k.split(',')[0]}"] = v
        for section in ("flops", "tokens", "timing", "memory", "loyalty"):
            if isinstance(record.get(section), dict):
                flat(section, {k: v for k, v in record[section].items() if not isinstance(v, list)}, summary)
        self.run.summary.update(summary)
        self.run.log(summary)
        if predictions:
            self.run.log({f"{task}/samples": samples_table(predictions)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
