"""Collection: the complete runs under the given directories, each read into one row."""

from __future__ import annotations

import os
from pathlib import Path
from dvlm_exp.reporting.report.labels import main_score, run_keys
from dvlm_exp.reporting.report.peers import peer_keys


# --------------------------------------------------------------------------------------------------
# Collection

SKIP_DIRS = {"wandb", ".submitit", "resume_cache", ".hydra", "__pycache__"}


def find_run_dirs(roots) -> dict[str, list[Path]]:
    """{"complete": [...], "failed": [...], "incomplete": [...]}: every directory under `roots` that holds a
    results.json, a failed.json or a .hydra/ (a Hydra job dir)."""
    from dvlm_exp.run import record as rec_io
    from dvlm_exp.run.resume import FAILED

    out: dict[str, list[Path]] = {"complete": [], "failed": [], "incomplete": []}
    seen = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            is_run = rec_io.RESULTS in filenames or FAILED in filenames or ".hydra" in dirnames
            dirnames[:] = sorted(x for x in dirnames if x not in SKIP_DIRS)
            if not is_run or d.resolve() in seen:
                continue
            seen.add(d.resolve())
            if rec_io.is_complete(d):
                out["complete"].append(d)
            elif FAILED in filenames:
                out["failed"].append(d)
            else:
                out["incomplete"].append(d)
    return out


def _hydra_choices(run_dir: Path) -> dict:
    p = run_dir / ".hydra" / "hydra.yaml"
    if not p.is_file():
        return {}
    try:
        import yaml

        h = yaml.safe_load(p.read_text()) or {}
        return dict(((h.get("hydra") or {}).get("runtime") or {}).get("choices") or {})
    except Exception:  # noqa: BLE001 - a damaged hydra.yaml only loses the preset name
        return {}


def load_run(run_dir: Path, maps: dict | None = None) -> dict:
    from dvlm_exp.run import record as rec_io

    rec = rec_io.read_results(run_dir)
    cfg = rec["config"]
    keys = run_keys(cfg, _hydra_choices(run_dir), maps)
    score, score_metric = main_score(rec)
    sweep = cfg.get("sweep") or {}
    f, t, tok = rec.get("flops") or {}, rec.get("timing") or {}, rec.get("tokens") or {}
    vis = tok.get("visual_per_sample") or []
    vis_avg = sum(vis) / len(vis) if vis else None
    gen = rec.get("generation") or {}
    return peer_keys({
        "run_dir": str(run_dir),
        "sweep": sweep.get("name"),
        "paper": sweep.get("paper"),
        "table": sweep.get("table"),
        **{k: v for k, v in keys.items() if k != "benchmarks"},
        "benchmarks": keys["benchmarks"],
        "lmms_task": rec.get("task"),
        "score": score,
        "score_metric": score_metric,
        "n_samples": rec.get("n_samples"),
        "limit": cfg.get("limit"),
        "seed": cfg.get("seed"),
        "ratio": cfg.get("ratio"),
        "gen": f"{gen.get('gen_length')}/{gen.get('block_length')}/{gen.get('steps')}",
        "flops_reduction": f.get("reduction"),
        "flops_total": f.get("total"),
        "flops_convention": f.get("convention"),
        "latency_s": t.get("latency_s_per_sample"),
        "tokens_per_s": t.get("tokens_per_s"),
        "nfe": t.get("nfe"),
        "kept_fraction": (tok.get("visual_kept_avg") / vis_avg) if vis_avg else None,
        "mtime": (run_dir / rec_io.RESULTS).stat().st_mtime,
        "wandb_group": (rec.get("wandb") or {}).get("group"),  # the W&B group it was logged under
    }, cfg, rec, maps)
