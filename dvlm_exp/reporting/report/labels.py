"""Name mappings (ours -> the papers' published.yaml vocabulary) and one run's keys and main score (also used by dvlm_exp.run.wandb_log, inside every job: nothing heavy here)."""

from __future__ import annotations

import os
from pathlib import Path


REPO = Path(__file__).resolve().parents[3]

# --------------------------------------------------------------------------------------------------
# Name mappings: ours -> the papers' (published.yaml) vocabulary. `--map kind:ours=theirs` adds to them.

MODEL_LABELS = {
    "llada_v": "LLaDA-V",
    "lavida_dream": "LaViDa-Dream",
    "lavida_llada": "LaViDa-LLaDA",
    "tiny": "tiny",
}

# Keyed by the prune preset (the Hydra choice: conf/prune/<x>.yaml or sweeps/prune/<x>.yaml), then by
# prune.name. "baseline" is published.yaml's name for the unpruned row.
METHOD_LABELS = {
    "none": "baseline",
    "fastv": "FastV",
    "study_fastv": "FastV",
    "llada_fastv": "LLaDA-FastV",
    "random": "Random",
    "redvtp": "RedVTP",
    "sparsevlm": "SparseVLM",
    "study_sparsevlm": "SparseVLM",
    "divprune": "DivPrune",
    "study_divprune": "DivPrune",
    "vtw": "VTW",
    "study_vtw": "VTW",
    "tome": "ToMe",
    "trim": "TRIM",
    "study_trim": "TRIM",
    "study_trim_lavida": "TRIM",
    "visipruner": "VisiPruner",
    "skip": "LayerSkip",
}

# Our task preset (config.task.name) -> the benchmark labels a paper may use (the first is the column name
# when nothing published matches). The LaViDa-Dream table calls MMMU-Pro(V) "MMMU-Pro".
BENCHMARK_LABELS = {
    "mme": ["MME"],
    "scienceqa_img": ["ScienceQA"],
    "gqa": ["GQA"],
    "pope": ["POPE"],
    "mmbench_en_dev": ["MMBench"],
    "textvqa_val": ["TextVQA"],
    "chartqa": ["ChartQA"],
    "mmmu_pro": ["MMMU-Pro (vision)", "MMMU-Pro"],
    "docvqa_val": ["DocVQA"],
    "infovqa_val": ["InfoVQA"],
    "video_dc499": ["Video Detail Caption (GPT-judged, 0-5)"],
    "videomme": ["VideoMME"],
    "mathvista_testmini": ["MathVista"],
    "synth_docvqa": ["SynthDocVQA"],
    "synth_video_caption": ["SynthVideoCaption"],
}

# lmms-eval task (results.json "task") -> (metrics, scale, unit): the paper-scale score is
# scale * sum(metrics). MME is perception + cognition (the study reports the sum); POPE's paper column is
# read as accuracy (the study does not say; pope_f1_score is also in results.json).
_ANLS = (("anls",), 100.0, "ANLS 0-100")
SCORE_SPECS: dict[str, tuple[tuple[str, ...], float, str]] = {
    "mme": (("mme_perception_score", "mme_cognition_score"), 1.0, "perception + cognition (0-2800)"),
    "scienceqa_img": (("exact_match",), 100.0, "exact match %"),
    "gqa": (("exact_match",), 100.0, "exact match %"),
    "pope": (("pope_accuracy",), 100.0, "accuracy %"),
    "mmbench_en_dev": (("gpt_eval_score",), 1.0, "accuracy % (lmms-eval already x100)"),
    "mmbench_en_dev_static": (("gpt_eval_score",), 1.0, "accuracy % (lmms-eval already x100)"),
    "textvqa_val": (("exact_match",), 100.0, "VQA accuracy %"),
    "chartqa": (("relaxed_overall",), 100.0, "relaxed accuracy %"),
    "mmmu_pro_vision": (("mmmu_acc",), 100.0, "accuracy %"),
    "mmmu_pro_standard": (("mmmu_acc",), 100.0, "accuracy %"),
    "docvqa_val": _ANLS,
    "docvqa_val_llada_v": _ANLS,
    "infovqa_val": _ANLS,
    "infovqa_val_llada_v": _ANLS,
    "synth_docvqa": _ANLS,
    "video_dc499": (("gpt_eval_score",), 1.0, "judge score 0-5"),
    "synth_video_caption": (("judge_score",), 1.0, "judge score 0-5"),
    "videomme": (("videomme_perception_score",), 1.0, "accuracy % (lmms-eval already x100)"),
}

# Methods whose `ratio` is not a keep ratio: VTW withdraws every visual token (the study's "keep 0 %"),
# VisiPruner's count is adaptive, skip removes nothing.
FIXED_KEEP = {"none": 1.0, "vtw": 0.0}
NO_KEEP = {"visipruner", "skip"}

AVG_LABEL = "Avg (relative %)"


PUBLISHED = Path(__file__).resolve().parents[1] / "published.yaml"  # shipped with the package


def published_default() -> Path:
    """$DVLM_PUBLISHED, else the published numbers shipped in the package (dvlm_exp/reporting/published.yaml)."""
    env = os.environ.get("DVLM_PUBLISHED")
    return Path(env) if env else PUBLISHED


# --------------------------------------------------------------------------------------------------
# One run's keys and score (also used by dvlm_exp.run.wandb_log)

def _metric(metrics: dict, name: str):
    for k, v in metrics.items():
        if k.split(",")[0] == name and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def main_score(record: dict) -> tuple[float | None, str]:
    """(score on the paper's scale, what it is). None when the run was not scored (predict-only: lmms-eval's
    `bypass`; a judged task without its judge) or the metric is missing."""
    metrics = record.get("metrics") or {}
    task = record.get("task") or ""
    spec = SCORE_SPECS.get(task)
    if spec is not None:
        names, scale, unit = spec
        vals = [_metric(metrics, n) for n in names]
        if any(v is None for v in vals):
            return None, f"missing {'+'.join(n for n, v in zip(names, vals) if v is None)} (predict-only?)"
        return scale * sum(vals), f"{'+'.join(names)}{f' x{scale:g}' if scale != 1 else ''} ({unit})"
    for k, v in metrics.items():  # unmapped task: its first numeric, non-stderr, non-bypass metric as is
        name = k.split(",")[0]
        if "stderr" in name or name == "bypass":
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v), f"{name} (unmapped task {task}: raw)"
    return None, "no numeric metric"


def keep_ratio(cfg: dict) -> float | None:
    """The keep ratio a paper would print: `ratio`, except none (1), vtw (0), visipruner / skip (None)."""
    name = cfg["prune"]["name"]
    if name in FIXED_KEEP:
        return FIXED_KEEP[name]
    if name in NO_KEEP:
        return None
    return float(cfg["ratio"])


def prune_start(cfg: dict):
    """published.yaml's prune_step_or_start: None (no pruning), "step0", a fraction (start_frac), ..."""
    if cfg["prune"]["name"] == "none":
        return None
    s = cfg.get("schedule") or {}
    name = s.get("name")
    if name == "first_step":
        return "step0"
    if name == "at_step":
        return f"step{s.get('step')}"
    if name in ("start_frac", "late_step"):
        return float(s.get("frac", 0.75 if name == "late_step" else 0.5))
    if name == "every_step":
        return f"every_step{s.get('start', 0)}"
    if name == "confidence":
        return f"confidence{s.get('threshold')}"
    return name


def prune_layer(cfg: dict):
    p = cfg["prune"]
    if p["name"] == "none":
        return None
    for key in ("layer", "layers", "shallow_mid_layer"):
        v = p.get(key)
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            return int(v[0]) if len(v) == 1 else ",".join(str(x) for x in v)
        return int(v)
    return None


def run_keys(cfg: dict, choices: dict | None = None, maps: dict | None = None) -> dict:
    """The run's identity in the papers' vocabulary. `choices`: Hydra's runtime choices (prune preset)."""
    maps = maps or {}
    prune = cfg["prune"]["name"]
    preset = (choices or {}).get("prune") or prune
    model = cfg["model"]["name"]
    task = cfg["task"]["name"]
    method_map = {**METHOD_LABELS, **maps.get("method", {})}
    labels = maps.get("task", {}).get(task)
    return {
        "model": model,
        "model_label": {**MODEL_LABELS, **maps.get("model", {})}.get(model, model),
        "prune": prune,
        "preset": preset,
        "method": method_map.get(preset) or method_map.get(prune) or prune,
        "keep_ratio": keep_ratio(cfg),
        "start": prune_start(cfg),
        "layer": prune_layer(cfg),
        "task": task,
        "benchmarks": [labels] if labels else list(BENCHMARK_LABELS.get(task, [task])),
        "schedule": (cfg.get("schedule") or {}).get("name"),
    }
