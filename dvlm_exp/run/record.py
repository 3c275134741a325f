"""results.json: the one record per run, written atomically with a completion marker.

A run writes nothing until it has finished; then results.json (via a temp file + rename)
and the marker `.dvlm_complete`. `is_complete(dir)` is what resume logic and reports trust.
Every file of a run goes through `write_atomic`: a write that fails (read-only or full disk)
leaves no temp file and raises `WriteError`, which the job reports in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

RESULTS = "results.json"
MARKER = ".dvlm_complete"
SCHEMA_VERSION = 1


class WriteError(OSError):
    """A run's file could not be written; str() is the one line the job prints."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(err.errno, err.strerror or str(err))
        self.path = Path(path)
        self.free = free_mb(self.path)  # now: the space may be back by the time someone reads the message

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror} (free space: {self.free} MB)"


def free_mb(path: Path) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.0f}"
    except OSError:
        return "unknown"


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the mode open() would (a group may read)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from e
        raise


def _umask() -> int:
    """The process's umask (Linux reads it without changing it; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


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
