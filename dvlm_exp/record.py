"""results.json: the one record per run, written atomically with a completion marker.

A run writes nothing until it has finished; then results.json (via a temp file + rename)
and the marker `.dvlm_complete`. `is_complete(dir)` is what resume logic and reports trust.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RESULTS = "results.json"
MARKER = ".dvlm_complete"
SCHEMA_VERSION = 1


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_results(run_dir: str | Path, record: dict) -> Path:
    run_dir = Path(run_dir)
    record = {"schema_version": SCHEMA_VERSION, "status": "complete", **record}
    path = run_dir / RESULTS
    write_atomic(path, json.dumps(record, indent=2, sort_keys=False, default=_jsonable))
    write_atomic(run_dir / MARKER, "complete\n")
    return path


def is_complete(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    if not (run_dir / MARKER).is_file():
        return False
    try:
        return json.loads((run_dir / RESULTS).read_text()).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def read_results(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / RESULTS).read_text())


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    except ImportError:  # pragma: no cover
        pass
    return str(x)
