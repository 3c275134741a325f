"""Peer-table join: the AR-baseline tables (FastV README, LLaVA-1.5 token reduction, VisiPruner's GQA log) and LaViDa's Prefix-DLM x NFE table name rows, models, start points and scores their own way."""

from __future__ import annotations

from pathlib import Path
from dvlm_exp.reporting.report.labels import _metric
from dvlm_exp.reporting.report.published import matches


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
