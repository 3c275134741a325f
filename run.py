"""python run.py [model=...] [prune=...] [prune.layer=K] [ratio=r] [schedule=...] [task=...] [-m ...]

Thin Hydra entry point: the job lives in dvlm_exp.runner (imported lazily so that --help and
config errors answer without loading torch or lmms-eval).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from dvlm_exp.runner import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    main()
