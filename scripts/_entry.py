"""What every scripts/<x>.py does: re-run itself in the project's venv when no environment is
active (dvlm_exp/_venv.py, loaded from its file: no sys.path edit), then call the package
module's main(). The same mains are console scripts (pyproject.toml [project.scripts]).
"""

import importlib
import importlib.util
import sys
from pathlib import Path

_VENV = Path(__file__).resolve().parents[1] / "dvlm_exp" / "_venv.py"


def run(module: str) -> None:
    spec = importlib.util.spec_from_file_location("_dvlm_venv", _VENV)
    venv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(venv)
    venv.use_project_venv()
    sys.exit(importlib.import_module(module).main())
