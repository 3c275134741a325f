"""lmms-eval task YAMLs of this project.

Use this folder as lmms-eval's ``include_path``::

    TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
