"""Loyalty: how often a pruned run answers like the unpruned model on the same samples.

`loyalty=true` (top-level config, default false: it can double a run's generation time the first
time) adds to results.json::

    loyalty: {exact_match, anls, n, baseline_key, baseline_reused, baseline_path}

- exact_match: share of samples whose prediction equals the unpruned prediction (after strip);
- anls: mean of lmms-eval's `anls` metric (lower-cased, whitespace-collapsed Levenshtein
  similarity, 0 below 0.5) with the unpruned prediction as the reference;
- n: samples compared (matched by lmms-eval doc_id).

The unpruned predictions come from a cache, `$DVLM_CACHE/baselines/<baseline_key>/predictions.jsonl`,
keyed by a hash of what decides them: the resolved model block, the task block (generation preset,
frames, data; not the judge keys), limit and seed. A miss is filled on demand: the runner runs the
same task with prune=none in-process, reusing the loaded model (lmms-eval predict-only, no judge),
and publishes the folder atomically; later runs reuse it. A prune=none run with loyalty=true
publishes its own predictions when the cache is empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dvlm_exp.run.paths import cache_dir

KEY_VERSION = 1
_TASK_KEYS_IGNORED = ("judge_metric", "judge_via")


def baseline_fields(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    task = {k: v for k, v in c["task"].items() if k not in _TASK_KEYS_IGNORED}
    return {"version": KEY_VERSION, "model": c["model"], "task": task, "limit": c.get("limit"), "seed": c.get("seed")}


def baseline_key(cfg: DictConfig) -> str:
    blob = json.dumps(baseline_fields(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def baseline_dir(cfg: DictConfig) -> Path:
    return cache_dir() / "baselines" / baseline_key(cfg)


def read_predictions(path: Path) -> dict:
    """doc_id -> prediction text of a predictions.jsonl."""
    out = {}
    for ln in Path(path).read_text().splitlines():
        if ln.strip():
            p = json.loads(ln)
            out[p["doc_id"]] = p.get("prediction") or ""
    return out


def load_baseline(cfg: DictConfig) -> dict | None:
    d = baseline_dir(cfg)
    if not (d / "meta.json").is_file():  # written last: the folder is complete
        return None
    try:
        return read_predictions(d / "predictions.jsonl")
    except (OSError, ValueError, KeyError):
        return None


def save_baseline(cfg: DictConfig, predictions: list[dict]) -> Path:
    """Publish {doc_id, prediction} rows atomically (a temp folder renamed into place); an existing
    complete baseline (a concurrent job's) is kept."""
    d = baseline_dir(cfg)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.parent / f".{d.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        rows = [{"doc_id": p["doc_id"], "prediction": p.get("prediction") or ""} for p in predictions]
        (tmp / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta = {"key": baseline_key(cfg), "fields": baseline_fields(cfg), "n": len(rows),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        if (d / "meta.json").is_file():
            return d
        if d.exists():  # an incomplete leftover
            shutil.rmtree(d, ignore_errors=True)
        try:
            os.rename(tmp, d)
        except OSError:
            if not (d / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def compare(predictions: dict, baseline: dict) -> dict:
    """Exact match and ANLS (lmms-eval's `anls`) of predictions against baseline predictions, by doc_id."""
    from lmms_eval.api.metrics import anls

    ids = sorted(set(predictions) & set(baseline), key=lambda x: (str(type(x)), x))
    if not ids:
        return {"exact_match": None, "anls": None, "n": 0}
    em = sum(predictions[i].strip() == baseline[i].strip() for i in ids) / len(ids)
    a = sum(anls(references=[baseline[i]], predictions=[predictions[i]])["anls"] for i in ids) / len(ids)
    return {"exact_match": em, "anls": a, "n": len(ids)}


def compute(cfg: DictConfig, predictions: list[dict], make_baseline) -> dict:
    """results.json `loyalty` for this run's predictions; `make_baseline()` -> unpruned predictions
    (list of {doc_id, prediction}) is called only when the cache has none."""
    t0 = time.perf_counter()
    key = baseline_key(cfg)
    mine = {p["doc_id"]: p.get("prediction") or "" for p in predictions}
    base = load_baseline(cfg)
    reused = base is not None
    source = "cache"
    if base is None:
        if cfg.prune.name == "none":
            rows, source = predictions, "this run"
        else:
            rows, source = make_baseline(), "generated"
        save_baseline(cfg, rows)
        base = {p["doc_id"]: p.get("prediction") or "" for p in rows}
    out = compare(mine, base)
    missing = len(set(mine) - set(base))
    out.update(baseline_key=key, baseline_reused=reused, baseline_source=source,
               baseline_path=str(baseline_dir(cfg) / "predictions.jsonl"), seconds=time.perf_counter() - t0)
    if missing:
        out["missing_in_baseline"] = missing
    return out


def summary_line(record: dict) -> str | None:
    lo = record.get("loyalty")
    if not lo or lo.get("n") in (None, 0):
        return None
    return (f"  loyalty   exact_match={lo['exact_match']:.4f} anls={lo['anls']:.4f} vs unpruned (n={lo['n']}, "
            f"baseline {lo['baseline_key']} {'reused' if lo['baseline_reused'] else lo['baseline_source']})")
