"""Published rows (published.yaml) and the match of a run to them."""

from __future__ import annotations

from pathlib import Path


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
