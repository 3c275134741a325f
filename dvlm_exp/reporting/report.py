"""Paper-layout report from results.json files (scripts/report.py), and the name mapping shared with W&B.

    python scripts/report.py outputs/sweeps                    # every complete run under the dir(s)
    python scripts/report.py outputs/sweeps/study_table1 outputs/sweeps/llada_v_baseline --out /tmp/rep

A run is one directory holding `results.json` + `.dvlm_complete` (dvlm_exp.run.record.is_complete); directories
with `failed.json`, or a `.hydra/` but no complete record (still running, killed), are skipped and counted.
Each run becomes one row of `runs.csv`: its keys in the papers' vocabulary (see the mappings below and
docs/report.md) and its main score on the paper's scale. Runs are then matched to the rows of
dvlm_exp/reporting/published.yaml by (model, method, keep_ratio, prune start, layer, benchmark) and laid out
as the paper's tables: rows = model x method x keep ratio (x start, x layer where they vary), columns =
benchmarks, cells = ours / published / delta; plus an efficiency table (our FLOPs reduction, our and the
published time change vs the baseline), PNG plots (accuracy vs FLOPs reduction with the Pareto front,
accuracy vs keep ratio with the published points, accuracy vs layer), report.md and report.html. The last
stdout line of scripts/report.py is a JSON summary.

Nothing heavy is imported at module level: dvlm_exp.run.wandb_log imports the mappings (`main_score`,
`run_keys`) inside every job.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

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


PUBLISHED = Path(__file__).resolve().parent / "published.yaml"  # shipped with the package


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


# --------------------------------------------------------------------------------------------------
# Peer-table join (issue 17): the AR-baseline tables (FastV README, the LLaVA-1.5 token-reduction table,
# VisiPruner's GQA log) and LaViDa's Prefix-DLM x NFE table name their rows, models, start points and
# benchmarks otherwise than the study's tables. `peer_keys` rewrites a run's keys into their vocabulary;
# `expand_readings` turns a run whose benchmark a table reads in another way (MME perception / cognition
# apart, POPE F1) into one entry per reading.

AR_FAMILIES = {"llava_1_5", "llava_next"}

# lmms-eval task -> labels with the same score as main_score (added to the run's benchmarks)
PEER_ALIASES = {
    "mme": ["MME (perception+cognition)"],
    "coco2017_cap_val": ["COCO caption (CIDEr)"],  # the LaViDa README's COCO column (split not named there)
}
# lmms-eval task -> [(label, metrics, scale)]: readings of the same run with another score
PEER_READINGS: dict[str, list[tuple[str, tuple[str, ...], float]]] = {
    "mme": [("MME-Perception", ("mme_perception_score",), 1.0), ("MME-Cognition", ("mme_cognition_score",), 1.0)],
    "pope": [("POPE (F1)", ("pope_f1_score",), 100.0)],
}
# lmms-eval task -> (labels, metrics, scale) for tasks SCORE_SPECS / BENCHMARK_LABELS do not know
PEER_SCORES: dict[str, tuple[list[str], tuple[str, ...], float, str]] = {
    "mmmu_val": (["MMMU"], ("mmmu_acc",), 100.0, "accuracy %"),
    "seedbench": (["SEED-Bench (image)", "SEED"], ("seed_image",), 100.0, "image accuracy %"),
    "vqav2_val": (["VQAv2"], ("exact_match",), 100.0, "VQA accuracy % (val)"),
    "nocaps_val": (["NoCaps (CIDEr)"], ("nocaps_CIDEr",), 100.0, "CIDEr x100"),
    "coco2014_cap_val": (["COCO caption val2014 (CIDEr)"], ("coco_CIDEr",), 100.0, "CIDEr x100"),
    "coco2017_cap_val": (["COCO caption val2017 (CIDEr)"], ("coco_CIDEr",), 100.0, "CIDEr x100"),
    "flickr30k": (["Flickr30K (CIDEr)"], ("flickr_CIDEr",), 100.0, "CIDEr x100"),
    "flickr30k_test": (["Flickr30K (CIDEr)"], ("flickr_CIDEr",), 100.0, "CIDEr x100"),
}


def _reading(metrics: dict, names, scale):
    vals = [_metric(metrics, n) for n in names]
    return None if any(v is None for v in vals) else scale * sum(vals)


def ar_model_label(cfg: dict) -> str:
    """LLaVA-1.5-<size>B from the checkpoint folder's name (llava-1.5-13b-hf -> 13B); 7B when it names none."""
    import re

    m = re.search(r"(?i)(\d+)b(?![a-z])", Path(str(cfg["model"].get("path") or "")).name)
    base = {"llava_1_5": "LLaVA-1.5", "llava_next": "LLaVA-1.6"}.get(cfg["model"]["name"], cfg["model"]["name"])
    return f"{base}-{m.group(1) if m else 7}B"


def fastv_readme_label(cfg: dict) -> str:
    """The FastV README's row name: K = the first layer that sees the pruned sequence, R = the share pruned."""
    return f"FastV K={cfg['prune']['layer']} R={round(100 * (1 - float(cfg['ratio'])))}%"


def lavida_cache_label(cfg: dict) -> str:
    """The LaViDa README's COCO row name: Prefix-DLM cache on / off x NFE (steps / answer length)."""
    g = (cfg.get("task") or {}).get("gen") or {}
    pc = cfg["model"].get("prefix_cache")
    cache = {True: "on (Prefix-DLM)", "mask_only": "off (prefix mask)"}.get(pc, "off")
    return f"KV cache {cache}, NFE {round(100 * int(g['steps']) / int(g['gen_length']))}%"


def peer_keys(run: dict, cfg: dict, rec: dict, maps: dict | None = None) -> dict:
    """`run` (load_run's row) in the peer tables' vocabulary; unchanged for the study's tables."""
    maps = maps or {}
    model, sweep = cfg["model"], cfg.get("sweep") or {}
    task = rec.get("task") or ""
    if model.get("family") in AR_FAMILIES:
        if model["name"] not in maps.get("model", {}):
            run["model_label"] = ar_model_label(cfg)
        if run["start"] == "step0":  # the AR engine prunes in the prefill (schedule step 0)
            run["start"] = "prefill"
        if sweep.get("paper") == "fastv" and run["prune"] == "fastv":
            run["method"] = fastv_readme_label(cfg)
    if (sweep.get("paper"), sweep.get("table")) == ("lavida", "readme_coco") and run["prune"] == "none":
        run["method"] = lavida_cache_label(cfg)
    metrics = rec.get("metrics") or {}
    if task in PEER_SCORES:
        labels, names, scale, unit = PEER_SCORES[task]
        run["score"] = _reading(metrics, names, scale)
        run["score_metric"] = f"{'+'.join(names)} x{scale:g} ({unit})"
        if cfg["task"]["name"] not in maps.get("task", {}):
            run["benchmarks"] = list(labels)
    run["benchmarks"] = list(run["benchmarks"]) + [b for b in PEER_ALIASES.get(task, []) if b not in run["benchmarks"]]
    readings = {label: _reading(metrics, names, scale) for label, names, scale in PEER_READINGS.get(task, [])}
    run["readings"] = {k: v for k, v in readings.items() if v is not None}
    return run


def expand_readings(runs: list[dict], pub_rows: list[dict]) -> list[dict]:
    """One table entry per reading a published row asks for: a run with `readings` (MME-Perception, POPE
    (F1), ...) adds a copy per reading that some published row describes (benchmarks = [that label], score =
    that reading); the run itself stays unless only its copies match (then it lends them its place)."""
    out = []
    for r in runs:
        copies = [{**r, "benchmarks": [label], "score": v, "reading_of": r["run_dir"]}
                  for label, v in (r.get("readings") or {}).items()]
        copies = [c for c in copies if any(matches(c, p) for p in pub_rows)]
        own = not copies or any(matches(r, p) for p in pub_rows)
        out += ([r] if own else []) + copies
    return out


def _lend_tables(runs: list[dict], entries: list[dict]) -> None:
    """After build_tables: a run represented only by its reading copies takes the first copy's table."""
    by_run: dict[str, dict] = {}
    for e in entries:
        by_run.setdefault(e.get("reading_of") or e["run_dir"], e)
    for r in runs:
        if "table_id" not in r and r["run_dir"] in by_run:
            r["table_id"], r["pub"] = by_run[r["run_dir"]]["table_id"], by_run[r["run_dir"]].get("pub")


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


# --------------------------------------------------------------------------------------------------
# Published rows

def _start(v):
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return str(v)


def load_published(path) -> tuple[list[dict], dict]:
    """(rows, tables): every published.yaml table row that has a numeric score, and {table_id: info}."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    rows, tables = [], {}
    for paper in data.get("papers") or []:
        for t in paper.get("tables") or []:
            tid = f"{paper['key']}/{t['id']}"
            tables[tid] = {"paper": paper["key"], "table": t["id"], "title": paper.get("title", ""),
                           "arxiv": paper.get("arxiv"), "caption": t.get("caption", ""), "benchmarks": []}
            for r in t.get("rows") or []:
                score = r.get("score")
                if not isinstance(score, (int, float)) or isinstance(score, bool):
                    continue
                if r.get("benchmark") not in tables[tid]["benchmarks"]:
                    tables[tid]["benchmarks"].append(r.get("benchmark"))
                keep = r.get("keep_ratio")
                rows.append({
                    "table_id": tid, "paper": paper["key"], "table": t["id"],
                    "model": r.get("model"), "method": r.get("method"),
                    "keep_ratio": None if keep is None else float(keep),
                    "start": _start(r.get("prune_step_or_start")),
                    "layer": r.get("prune_layer"),
                    "benchmark": r.get("benchmark"), "score": float(score),
                    "time_change_pct": r.get("time_change_pct"),
                })
    return rows, tables


def _close(a, b) -> bool:
    return abs(float(a) - float(b)) < 1e-6


def _eq_opt(ours, pub) -> bool:
    if pub is None or ours is None:
        return pub is None and ours is None
    if isinstance(pub, float) or isinstance(ours, float):
        try:
            return _close(ours, pub)
        except (TypeError, ValueError):
            return False
    return str(ours) == str(pub)


def matches(run: dict, pub: dict) -> bool:
    """Does the published row describe this run? model, method, benchmark by label; keep ratio and start
    exactly (None only matches None); the layer only when the paper states one."""
    if run["model_label"] != pub["model"] or run["method"] != pub["method"]:
        return False
    if pub["benchmark"] not in run["benchmarks"]:
        return False
    if not _eq_opt(run["keep_ratio"], pub["keep_ratio"]) or not _eq_opt(run["start"], pub["start"]):
        return False
    return pub["layer"] is None or str(run["layer"]) == str(pub["layer"])


# --------------------------------------------------------------------------------------------------
# Tables

def _fmt_key(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_num(v, signed=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    v = float(v) + 0.0  # no "-0.00"
    s = f"{v:+.2f}" if abs(v) < 10 else f"{v:+.1f}"
    if s in ("-0.00", "+0.00"):
        s = "+0.00"
    return s if signed else s.lstrip("+")


def assign_tables(runs: list[dict], pub_rows: list[dict], tables: dict) -> dict:
    """Adds run["table_id"] and run["pub"] (the matched published row of that table, or None).
    A run goes to its sweep's table (sweep.paper / sweep.table) when published.yaml has it, else to the
    first published table with a matching row, else to the published table of its multirun siblings (same
    parent dir and model), else to "<paper or runs>/<sweep or model>" (ours only).
    Baseline runs are also shown in every other table of the same model (build_tables)."""
    for run in runs:
        cands = [p for p in pub_rows if matches(run, p)]
        tid = None
        if run.get("paper") and run.get("table"):
            want = f"{run['paper']}/{run['table']}"
            if want in tables:
                tid = want
                cands = [p for p in cands if p["table_id"] == want]
        if tid is None and cands:
            tid = cands[0]["table_id"]
            cands = [p for p in cands if p["table_id"] == tid]
        run["table_id"] = tid
        run["pub"] = cands[0] if cands else None
    # a run no published row describes, outside a paper sweep, joins the published table its multirun
    # siblings (same parent dir, same model) went to; else a table of its own sweep / model
    for run in runs:
        if run["table_id"] is not None:
            continue
        parent = str(Path(run["run_dir"]).parent)
        sib = [r["table_id"] for r in runs if r["table_id"] in tables and r["model"] == run["model"]
               and str(Path(r["run_dir"]).parent) == parent and r["method"] != "baseline"]
        run["table_id"] = (max(set(sib), key=sib.count) if sib
                           else f"{run.get('paper') or 'runs'}/{run.get('sweep') or run['model']}")
    return {r["run_dir"]: r["table_id"] for r in runs}


def build_tables(runs: list[dict], pub_rows: list[dict], tables: dict) -> list[dict]:
    """Per table: {"id", "info", "key_cols", "benchmarks", "scores" (DataFrame), "efficiency" (DataFrame), ...}.
    scores columns: key_cols + "<benchmark>|ours", "|published", "|delta"; efficiency: "<benchmark>|flops_red_pct",
    "|time_change_pct", "|time_change_pct_published". Baseline runs appear in every table of their model (in
    the columns that table has) and make a table of their own only when their model has no other."""
    import pandas as pd

    assign_tables(runs, pub_rows, tables)
    baselines = [r for r in runs if r["method"] == "baseline"]
    pruned = [r for r in runs if r["method"] != "baseline"]
    models_with_tables = {r["model_label"] for r in pruned}
    tids: list[str] = []
    for r in pruned + [b for b in baselines if b["model_label"] not in models_with_tables]:
        if r["table_id"] not in tids:
            tids.append(r["table_id"])
    out = []
    for tid in tids:
        info = tables.get(tid) or {"paper": tid.split("/")[0], "table": tid.split("/", 1)[1], "title": "",
                                   "caption": "our runs (no published table)", "arxiv": None, "benchmarks": []}
        members = [r for r in pruned if r["table_id"] == tid]
        if not members:  # a baseline-only table
            members = [b for b in baselines if b["table_id"] == tid]
        models = {r["model_label"] for r in members}
        # baselines of this table's models; where the table has pruned runs of the task, only a baseline
        # with their generation preset (chartqa: the study's 8 steps vs the official 16); the best one last
        gens = {(r["model"], r["task"]): {x["gen"] for x in members if (x["model"], x["task"]) == (r["model"], r["task"])}
                for r in members}
        base_members = sorted(
            (b for b in baselines if b["model_label"] in models and b not in members
             and b["gen"] in gens.get((b["model"], b["task"]), {b["gen"]})),
            key=lambda b: (b.get("paper") == info["paper"], b["mtime"]))
        pubs = [p for p in pub_rows if p["table_id"] == tid and p["model"] in models]
        with_layer = tid not in tables or any(p["layer"] is not None for p in pubs)
        key_cols = ["model", "method", "keep_ratio", "start"] + (["layer"] if with_layer else [])
        bench_order = [b for b in info["benchmarks"] if any(p["benchmark"] == b for p in pubs)]

        def rowkey(model, method, keep, start, layer):
            k = (model, method, _fmt_key(keep), _fmt_key(start))
            return k + ((_fmt_key(layer),) if with_layer else ())

        cells: dict[tuple, dict] = {}
        for p in pubs:
            c = cells.setdefault(rowkey(p["model"], p["method"], p["keep_ratio"], p["start"], p["layer"]) + (p["benchmark"],), {})
            c.update(published=p["score"], time_change_pct_published=p["time_change_pct"], keep=p["keep_ratio"])
        superseded = 0
        for group, add_columns in ((sorted(members, key=lambda r: r["mtime"]), True), (base_members, False)):
            for r in group:
                if r["score"] is None:
                    continue
                bench = next((b for b in r["benchmarks"] if b in bench_order), None)
                if bench is None:
                    if not add_columns:
                        continue  # a baseline of a benchmark this table does not show
                    bench = r["benchmarks"][0]
                    bench_order.append(bench)
                key = rowkey(r["model_label"], r["method"], r["keep_ratio"], r["start"], _row_layer(r, pubs)) + (bench,)
                c = cells.setdefault(key, {})
                superseded += "ours" in c
                c.update(ours=r["score"], run_dir=r["run_dir"], keep=r["keep_ratio"],
                         flops_red_pct=None if r["flops_reduction"] is None else 100 * r["flops_reduction"],
                         time_change_pct=_time_change(r, baselines))
        order = {m: i for i, m in enumerate(dict.fromkeys(p["method"] for p in pubs))}  # the paper's row order
        rows = sorted({k[:-1] for k in cells}, key=lambda k: _row_sort(k, cells, order))
        if AVG_LABEL in bench_order:  # ours: mean of score / our baseline's score over the row's benchmarks
            bench_order.remove(AVG_LABEL)
            bench_order.append(AVG_LABEL)
            _fill_avg(rows, cells, bench_order, with_layer)
        score_recs, eff_recs = [], []
        for row in rows:
            s, e = dict(zip(key_cols, row)), dict(zip(key_cols, row))
            for b in bench_order:
                c = cells.get(row + (b,), {})
                ours, pub = c.get("ours"), c.get("published")
                s[f"{b}|ours"], s[f"{b}|published"] = ours, pub
                s[f"{b}|delta"] = (ours - pub) if ours is not None and pub is not None else None
                e[f"{b}|flops_red_pct"] = c.get("flops_red_pct")
                e[f"{b}|time_change_pct"] = c.get("time_change_pct")
                e[f"{b}|time_change_pct_published"] = c.get("time_change_pct_published")
            score_recs.append(s)
            eff_recs.append(e)
        scores = pd.DataFrame(score_recs, columns=key_cols + [f"{b}|{x}" for b in bench_order for x in ("ours", "published", "delta")])
        eff = pd.DataFrame(eff_recs, columns=key_cols + [f"{b}|{x}" for b in bench_order
                                                          for x in ("flops_red_pct", "time_change_pct", "time_change_pct_published")])
        ours_cells = [c for c in cells.values() if "run_dir" in c]
        out.append({"id": tid, "info": info, "key_cols": key_cols, "benchmarks": bench_order, "scores": scores,
                    "efficiency": eff, "runs": [m["run_dir"] for m in members + base_members],
                    "ours_cells": len(ours_cells),
                    "matched_cells": sum(1 for c in ours_cells if c.get("published") is not None),
                    "superseded": superseded})
    return out


def _row_layer(run: dict, pubs: list[dict]):
    """The layer of the table row a run lands on: its own, unless the paper has the row (same model, method,
    keep, start) without a layer and none at the run's layer: then the paper's row (layer not stated)."""
    same = [p for p in pubs if p["model"] == run["model_label"] and p["method"] == run["method"]
            and _eq_opt(run["keep_ratio"], p["keep_ratio"]) and _eq_opt(run["start"], p["start"])]
    if any(p["layer"] is not None and str(p["layer"]) == str(run["layer"]) for p in same):
        return run["layer"]
    if any(p["layer"] is None for p in same):
        return None
    return run["layer"]


def _row_sort(k, cells, order):
    keep = max((c["keep"] for kk, c in cells.items() if kk[:-1] == k and c.get("keep") is not None), default=-1.0)
    return (k[0], k[1] != "baseline", -keep if k[1] in order else 0, order.get(k[1], len(order)), k[1],
            -keep, tuple(_natural(x) for x in k[3:]))


def _natural(x: str):
    try:
        return (0, float(x), "")
    except ValueError:
        return (1, 0.0, x)


def _time_change(run: dict, baselines: list[dict]):
    """Our latency per sample vs the latest baseline run of the same model, task and generation preset, in %."""
    if run["method"] == "baseline":
        return 0.0
    cands = [b for b in baselines if b["model"] == run["model"] and b["task"] == run["task"]
             and b["lmms_task"] == run["lmms_task"] and b["gen"] == run["gen"] and b["latency_s"]]
    same_n = [b for b in cands if b["n_samples"] == run["n_samples"]]
    cands = same_n or cands
    if not cands or run["latency_s"] is None:
        return None
    base = max(cands, key=lambda b: b["mtime"])
    return 100.0 * (run["latency_s"] / base["latency_s"] - 1.0)


def _fill_avg(rows, cells, bench_order, with_layer: bool):
    """Ours for the "Avg (relative %)" column: mean over the row's benchmarks of score / our baseline's score,
    x100, over the benchmarks the paper averaged for that row (those with a published value), or, for a row
    the paper does not have, over every benchmark our baseline has; empty when one of them is missing."""
    benches = [b for b in bench_order if b != AVG_LABEL]
    for row in rows:
        base_row = (row[0], "baseline", "1", "-") + (("-",) if with_layer else ())
        need = [b for b in benches if cells.get(row + (b,), {}).get("published") is not None] or \
               [b for b in benches if cells.get(base_row + (b,), {}).get("ours") is not None]
        vals = []
        for b in need:
            o, base = cells.get(row + (b,), {}).get("ours"), cells.get(base_row + (b,), {}).get("ours")
            if o is None or not base:
                vals = []
                break
            vals.append(o / base)
        if vals:
            cells.setdefault(row + (AVG_LABEL,), {})["ours"] = 100.0 * sum(vals) / len(vals)


# --------------------------------------------------------------------------------------------------
# Plots

def make_plots(runs: list[dict], pub_rows: list[dict], plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    scored = [r for r in runs if r["score"] is not None]
    written = []
    for model in sorted({r["model"] for r in scored}):
        mr = [r for r in scored if r["model"] == model]
        benches = []  # one panel per benchmark and generation preset (ChartQA: the study's 8 steps vs 16)
        for r in mr:
            if (_bench_of(r), r["gen"]) not in benches:
                benches.append((_bench_of(r), r["gen"]))
        n_gen = {b: sum(1 for bb, _ in benches if bb == b) for b, _ in benches}
        for kind in ("pareto", "ratio", "layer"):
            panels = []
            for b, gen in benches:
                br = [r for r in mr if _bench_of(r) == b and r["gen"] == gen]
                if n_gen[b] > 1:
                    b = f"{b} (gen {gen})"
                if kind == "layer" and not _layer_lines(br):
                    continue
                if kind == "ratio" and not [r for r in br if r["method"] != "baseline" and r["keep_ratio"] is not None]:
                    continue
                panels.append((b, br))
            if not panels:
                continue
            n = len(panels)
            ncols = min(3, n)
            nrows = math.ceil(n / ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
            for ax, (b, br) in zip(axes.flat, panels):
                {"pareto": _plot_pareto, "ratio": _plot_ratio, "layer": _plot_layer}[kind](ax, br, pub_rows)
                score_axis(ax, br, b)
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            title = {"pareto": "accuracy vs FLOPs reduction (Pareto front dashed)",
                     "ratio": "accuracy vs keep ratio (hollow: published)", "layer": "accuracy vs pruning layer K"}[kind]
            fig.suptitle(f"{model}: {title}", fontsize=11)
            fig.tight_layout()
            path = plot_dir / f"{kind}_{model}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _samples(br) -> str:
    ns = sorted({r["n_samples"] for r in br if r.get("n_samples") is not None})
    if not ns:
        return "n = ?"
    if len(ns) == 1:
        return f"n = {ns[0]} sample{'s' if ns[0] != 1 else ''}"
    return f"n = {ns[0]}-{ns[-1]} samples"


def score_axis(ax, br, bench: str) -> None:
    """The y axis says what the score is (metric and scale, from SCORE_SPECS), the title the sample count;
    a score that cannot be negative gets no negative axis (0-100 scales end at 100)."""
    lmms = sorted({r["lmms_task"] for r in br if r.get("lmms_task")})
    spec = SCORE_SPECS.get(lmms[0]) if lmms else None
    if spec is not None:
        names, scale, unit = spec
        ylabel = f"{'+'.join(names)}{f' x{scale:g}' if scale != 1 else ''}: {unit}"
    else:
        ylabel = (br[0].get("score_metric") or "score") if br else "score"
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(f"{bench} ({_samples(br)})", fontsize=10)
    ys = [r["score"] for r in br if r.get("score") is not None] + [y for ln in ax.get_lines() for y in ln.get_ydata()]
    if ys and min(ys) >= 0:
        hi = ax.get_ylim()[1]
        if spec is not None and ("0-100" in spec[2] or "%" in spec[2]) and max(ys) <= 100:
            hi = 100.0  # the whole scale
        ax.set_ylim(0.0, hi if hi > 0 else 1.0)


def _bench_of(r):
    return (r.get("pub") or {}).get("benchmark") or r["benchmarks"][0]


def _label(r, vary_layer: bool, vary_start: bool) -> str:
    s = r["method"]
    if vary_layer and r["layer"] is not None:
        s += f" K={r['layer']}"
    if vary_start and r["start"] is not None:
        s += f" @{_fmt_key(r['start'])}"
    return s


def _lines(br, x_of, group_extra=()):
    """{label: [(x, y), ...]} over the non-baseline runs, latest run per point."""
    methods = {r["method"] for r in br}
    lines: dict[str, dict] = {}
    for m in sorted(methods - {"baseline"}):
        mr = [r for r in br if r["method"] == m]
        vary_layer = len({str(r["layer"]) for r in mr}) > 1 and "layer" not in group_extra
        vary_start = len({str(r["start"]) for r in mr}) > 1
        for r in sorted(mr, key=lambda r: r["mtime"]):
            x = x_of(r)
            if x is None:
                continue
            label = _label(r, vary_layer, vary_start)
            if "keep" in group_extra:
                label += f" keep {_fmt_key(r['keep_ratio'])}"
            lines.setdefault(label, {})[x] = r["score"]
    return {k: sorted(v.items()) for k, v in lines.items()}


def _baseline_line(ax, br):
    base = [r for r in br if r["method"] == "baseline"]
    if base:
        b = max(base, key=lambda r: r["mtime"])
        ax.axhline(b["score"], color="black", lw=1, ls=":", label="baseline")
        return b
    return None


def _plot_pareto(ax, br, pub_rows):
    pts = []
    for label, xy in _lines(br, lambda r: 100 * (r["flops_reduction"] or 0.0)).items():
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker="o", ms=4, lw=1, label=label)
        pts += list(xy)
    b = _baseline_line(ax, br)
    if b is not None:
        pts.append((0.0, b["score"]))
        ax.plot([0.0], [b["score"]], marker="s", color="black", ms=5)
    front, best = [], -math.inf
    for x, y in sorted(pts, key=lambda p: (-p[0], -p[1])):  # max reduction first; keep points that raise the best score
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        fx, fy = zip(*sorted(front))
        ax.plot(fx, fy, ls="--", color="gray", lw=1.2, label="Pareto front")
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)


def _plot_ratio(ax, br, pub_rows):
    lines = _lines(br, lambda r: r["keep_ratio"])
    for label, xy in lines.items():
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker="o", ms=4, lw=1, label=label)
    _baseline_line(ax, br)
    model_label = br[0]["model_label"]
    bench = _bench_of(br[0])
    methods = {r["method"] for r in br} - {"baseline"}
    starts = {r["start"] for r in br if r["method"] != "baseline"}
    for m in sorted(methods):
        pts = sorted({(p["keep_ratio"], p["score"]) for p in pub_rows
                      if p["model"] == model_label and p["benchmark"] == bench and p["method"] == m
                      and p["keep_ratio"] is not None and any(_eq_opt(s, p["start"]) for s in starts)})
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", mfc="none", ls=":", lw=1, label=f"{m} (published)")
    ax.set_xlabel("keep ratio (fraction of visual tokens kept)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)


def _layer_lines(br):
    return {k: v for k, v in _lines(br, lambda r: r["layer"] if isinstance(r["layer"], int) else None,
                                    group_extra=("layer", "keep")).items() if len(v) > 1}


def _plot_layer(ax, br, pub_rows):
    for label, xy in _layer_lines(br).items():
        xs, ys = zip(*xy)
        ax.plot(xs, ys, marker="o", ms=4, lw=1, label=label)
    _baseline_line(ax, br)
    ax.set_xlabel("pruning layer K (first layer that sees the pruned sequence)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)


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


# --------------------------------------------------------------------------------------------------
# Entry

def build_report(dirs, out, published=None, maps: dict | None = None, plots: bool = True) -> dict:
    """Collect, match, lay out, plot and render; returns the result (tables as DataFrames) and writes
    runs.csv, tables/*.csv, plots/*.png, report.md, report.html and summary.json under `out`."""
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = find_run_dirs(dirs)
    runs = []
    bad = 0
    for d in found["complete"]:
        try:
            runs.append(load_run(d, maps))
        except (KeyError, TypeError, ValueError, OSError):  # a record of another schema: counted as incomplete
            bad += 1
    pub_rows, tables = load_published(published) if published else ([], {})
    entries = expand_readings(runs, pub_rows)
    built = build_tables(entries, pub_rows, tables)
    _lend_tables(runs, entries)
    (out / "tables").mkdir(exist_ok=True)
    for t in built:
        t["scores"].to_csv(out / "tables" / f"{_slug(t['id'])}.csv", index=False)
        t["efficiency"].to_csv(out / "tables" / f"{_slug(t['id'])}_efficiency.csv", index=False)
    runs_df = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items() if k != "pub"}
                            | {"published": (r.get("pub") or {}).get("score"),
                               "published_table": (r.get("pub") or {}).get("table_id")} for r in runs])
    runs_df.to_csv(out / "runs.csv", index=False)
    plot_paths = make_plots(runs, pub_rows, out / "plots") if plots and runs else []
    result = {
        "inputs": [str(d) for d in dirs],
        "published": str(published) if published else None,
        "maps": maps or {},
        "counts": {"complete": len(runs), "failed": len(found["failed"]), "incomplete": len(found["incomplete"]) + bad,
                   "unscored": sum(1 for r in runs if r["score"] is None),
                   "superseded": sum(t["superseded"] for t in built)},
        "tables": built,
        "plots": [str(p) for p in plot_paths],
        "runs": runs,
    }
    md_path, html_path = render(result, out)
    result["summary"] = {
        "out": str(out), "report_md": str(md_path), "report_html": str(html_path),
        "runs": len(runs), "skipped": {"failed": len(found["failed"]), "incomplete": len(found["incomplete"]) + bad},
        "unscored": result["counts"]["unscored"], "superseded": result["counts"]["superseded"],
        "tables": [{"id": t["id"], "rows": len(t["scores"]), "benchmarks": t["benchmarks"],
                    "ours_cells": t["ours_cells"], "matched_cells": t["matched_cells"]} for t in built],
        "plots": [Path(p).name for p in plot_paths], "published": result["published"],
        "warnings": result["warnings"],
    }
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2))
    return result


def publish_wandb_report(result: dict, project: str, entity: str | None = None) -> str:
    """A W&B Report per sweep (dvlm_exp/reporting/wandb_report.py); returns its URL."""
    from dvlm_exp.reporting import wandb_report

    return wandb_report.publish(result, project, entity)
