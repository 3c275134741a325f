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
        for section in ("flops", "tokens", "timing", "memory"):
            flat(section, {k: v for k, v in record[section].items() if not isinstance(v, list)}, summary)
        self.run.summary.update(summary)
        self.run.log(summary)
        if predictions:
            cols = list(predictions[0])
            table = wandb.Table(columns=cols, data=[[p.get(c) for c in cols] for p in predictions])
            self.run.log({f"{task}/samples": table})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
