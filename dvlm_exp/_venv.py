"""Entry points run in the project's virtualenv (stdlib only: imported before any dependency).

`make install` installs into the active virtualenv / conda env, else into <repo>/.venv. So that
`python run.py` (and `python scripts/x.py`) work after it without activating anything, an entry
point calls `use_project_venv()` first: with no environment active and a .venv beside the package,
it re-executes the same command with that venv's Python. DVLM_NO_VENV=1 turns this off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def use_project_venv() -> None:
    if sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") or os.environ.get("DVLM_NO_VENV"):
        return  # a virtualenv / conda env is active: use it
    py = REPO / ".venv" / "bin" / "python"
    if py.is_file():
        os.execv(str(py), [str(py), *sys.argv])
    try:
        import hydra  # noqa: F401  (the first dependency an entry point needs)
    except ImportError:
        sys.exit(f"error: the project's dependencies are not installed for {sys.executable}: "
                 f"run `make install` in {REPO} (it makes {REPO / '.venv'})")
