"""Atomic publication of generated dataset folders (shared by the synthetic tasks).

A folder is built next to its destination, renamed into place, and carries `dvlm_meta.json`
(written last) with the generator id/version, the arguments and every file's size, so that
`is_complete` tells a finished, matching dataset from a half-written or foreign one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

META_FILE = "dvlm_meta.json"


def read_meta(out_dir: str | Path) -> dict | None:
    try:
        with open(Path(out_dir) / META_FILE, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(out_dir: str | Path, expected: dict) -> bool:
    """`out_dir` holds a finished dataset whose meta matches every key of `expected`, with
    every recorded file at its recorded size."""
    meta = read_meta(out_dir)
    if meta is None or any(meta.get(k) != v for k, v in expected.items()):
        return False
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        try:
            if (Path(out_dir) / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _looks_like_ours(out_dir: Path) -> bool:
    """Whether replacing `out_dir` can only lose a (possibly broken) generated dataset."""
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    entries = {p.name for p in out_dir.iterdir()}
    return not entries or META_FILE in entries or "dataset_dict.json" in entries


def publish(out_dir: str | Path, expected: dict, build: Callable[[Path], None], force: bool = False,
            what: str = "generated") -> Path:
    """Reuse `out_dir` when complete for `expected` (unless `force`), else build into a temporary
    sibling with `build(tmp_dir)`, write the meta last and rename into place. A non-empty folder
    that is not a dataset of ours is never deleted (FileExistsError naming `what`)."""
    out_dir = Path(out_dir).expanduser().resolve()
    if not force and is_complete(out_dir, expected):
        return out_dir
    if not _looks_like_ours(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a {what} dataset folder; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    old_dir = out_dir.parent / f".{out_dir.name}.old-{tag}"
    try:
        tmp_dir.mkdir()
        build(tmp_dir)
        files = {p.relative_to(tmp_dir).as_posix(): p.stat().st_size for p in sorted(tmp_dir.rglob("*")) if p.is_file()}
        (tmp_dir / META_FILE).write_text(json.dumps({**expected, "files": files}, indent=1, sort_keys=True) + "\n",
                                         encoding="utf-8")
        if out_dir.exists():
            os.rename(out_dir, old_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if is_complete(out_dir, expected):  # published concurrently by another process
                return out_dir
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(old_dir, ignore_errors=True)
    return out_dir
