"""The analysis files: CSV tables and the saved data, and loading them back."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


# ---------------------------------------------------------------------------------- files
def _write_csv(path: Path, rows: list[dict]) -> Path:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def _clean(x):
    """NaN / inf -> None (strict JSON: null), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_tables(data: dict, out_dir: Path, images: dict | None = None, overlay_samples: int = 2) -> list[Path]:
    """analysis.json (everything, incl. per-sample raw numbers and layouts) + one CSV per
    aggregate + the overlay samples' images (image_<sample>_<k>.png) so figures can be remade."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = data["aggregate"]
    paths = [_write_csv(out_dir / f"{name}.csv", agg[name]) for name in
             ("attention", "confidence", "contributions", "contributions_by_layer", "kept")]
    tmp = out_dir / "analysis.json.tmp"
    tmp.write_text(json.dumps(_clean(data), default=str, allow_nan=False))
    tmp.replace(out_dir / "analysis.json")
    paths.append(out_dir / "analysis.json")
    for s in data["samples"][: max(0, int(overlay_samples))]:
        for k, im in enumerate((images or {}).get(s["sample_id"], [])):
            p = out_dir / f"image_{s['sample_id']}_{k}.png"
            im.convert("RGB").save(p)
            paths.append(p)
    return paths


def load(out_dir: Path) -> tuple[dict, dict]:
    """(analysis.json, {sample_id: [images]}) of a previous analysis directory."""
    from PIL import Image

    out_dir = Path(out_dir)
    path = out_dir if out_dir.suffix == ".json" else out_dir / "analysis.json"
    data = json.loads(path.read_text())
    images = {}
    for s in data["samples"]:
        files = sorted(path.parent.glob(f"image_{s['sample_id']}_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if files:
            images[s["sample_id"]] = [Image.open(f).convert("RGB") for f in files]
    return data, images
