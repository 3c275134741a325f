"""python run.py [model=...] [prune=...] [prune.layer=K] [ratio=r] [schedule=...] [task=...] [-m ...]

Thin Hydra entry point: the job lives in dvlm_exp.run.runner (imported lazily so that --help and
config errors answer without loading torch or lmms-eval). Runs in the project's .venv when no
environment is active (dvlm_exp/_venv.py). Before Hydra runs, the command line is checked
(dvlm_exp.run.validate.check_overrides: syntax, config-group options, key names), then every job it
would launch (dvlm_exp.run.sweep_check: values, ranges, checkpoint): bad input ends with one `error:`
line and exit code 2, nothing run and no run dir made.
"""

import sys
from pathlib import Path

from dvlm_exp._venv import use_project_venv

use_project_venv()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from dvlm_exp.run.runner import main as run_main

    return run_main(cfg)


def check_command_line(argv: list[str]) -> None:
    """The command line (syntax, options, keys), then every job it would launch (values, ranges,
    checkpoint, data), before Hydra creates a run dir: bad input exits 2 and runs nothing."""
    from dvlm_exp.run.sweep_check import command_jobs_check
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check_overrides

    try:
        check_overrides(argv, CONF_DIR)
        command_jobs_check(argv, CONF_DIR)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    try:
        main()
    finally:  # a multirun whose jobs failed: name every one of them (Hydra names the first only)
        from dvlm_exp.run.sweep_check import failed_jobs_message

        msg = failed_jobs_message()
        if msg:
            print(msg, file=sys.stderr, flush=True)
