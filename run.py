"""python run.py [model=...] [prune=...] [prune.layer=K] [ratio=r] [schedule=...] [task=...] [-m ...]

Thin Hydra entry point: the job lives in dvlm_exp.runner (imported lazily so that --help and
config errors answer without loading torch or lmms-eval). Runs in the project's .venv when no
environment is active (dvlm_exp/_venv.py).
"""

from dvlm_exp._venv import use_project_venv

use_project_venv()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from dvlm_exp.runner import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    main()
