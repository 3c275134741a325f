"""Every job of a command checked before Hydra runs the first one (run.py; issue 18 items 3 and 9).

- `check_jobs(argv, conf_dir)`: the jobs the command would launch (one for a single run; for `-m`,
  Hydra's BasicSweeper expansion of `hydra.sweeper.params` and the command line, in launch order),
  each composed and passed through `dvlm_exp.run.validate.check` (values, ranges, the model's depth and
  config.json; the weight files and the task's data once per distinct model / task). Raises
  `ConfigError` listing every bad job at once, so a multirun with one bad job runs none of them and
  a bad single run leaves no run dir behind.
- `FailedJobs`: a Hydra callback (conf/config.yaml) that remembers the multirun's sweep dir and start
  time; `failed_jobs_message()` names every job that wrote failed.json in this multirun (Hydra's own
  message names the first failed job only).

Imports no torch (only `model.device=cuda` asks torch whether CUDA is there, as `check` does).
"""

from __future__ import annotations

import json
import time
from copy import deepcopy
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from dvlm_exp.errors import ConfigError

_MAX_LISTED = 20  # bad jobs listed in full; the rest are counted


def expand(argv_overrides: list[str], conf_dir: Path, multirun: bool) -> list[list[str]]:
    """Each job's override list, as Hydra's BasicSweeper hands them to the launcher."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(argv_overrides))
    if not multirun:
        return [[o.input_line for o in parsed]]
    # the multirun's own first composition: swept command-line values at their first value
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
             for o in parsed]
    hcfg = _compose(conf_dir, first, hydra=True)
    params = OmegaConf.select(hcfg, "hydra.sweeper.params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(argv_overrides)  # BasicSweeper.sweep's order
    return [list(job) for batch in BasicSweeper.split_arguments(parser.parse_overrides(lines), None) for job in batch]


def _compose(conf_dir: Path, overrides: list[str], hydra: bool = False) -> DictConfig:
    import warnings

    from hydra import compose, initialize_config_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def apply_value_overrides(cfg: DictConfig, overrides) -> None:
    """Plain value overrides (parsed by Hydra's OverridesParser) applied to a composed config as Hydra
    applies them after the defaults list: OmegaConf.update on the struct config, `+key=` force-added."""
    for o in overrides:
        if o.is_add() or o.is_force_add():
            with open_dict(cfg):
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True, force_add=True)
        else:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)


def job_configs(jobs: list[list[str]], conf_dir: Path):
    """Yield (job, cfg or the composition's exception). Jobs choosing the same config-group options
    share one composition; their value overrides are then applied as Hydra applies them after the
    defaults list (OmegaConf.update on the struct config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    groups = {p.name for root in (Path(conf_dir), Path(conf_dir).parent / "sweeps") if root.is_dir()
              for p in root.iterdir() if p.is_dir() and p.name != "hydra"}
    cache: dict[tuple, object] = {}
    for job in jobs:
        group_ov, value_ov = [], []
        for o in parser.parse_overrides(job):
            is_group = o.key_or_group.split("/")[0].split(".")[0] in groups and "." not in o.key_or_group
            (group_ov if is_group or o.key_or_group.startswith("hydra") or o.is_delete() else value_ov).append(o)
        key = tuple(o.input_line for o in group_ov)
        if key not in cache:
            try:
                cache[key] = _compose(conf_dir, list(key))
            except Exception as e:  # noqa: BLE001 - reported for this job
                cache[key] = e
        if isinstance(cache[key], Exception):
            yield job, cache[key]
            continue
        cfg = deepcopy(cache[key])
        try:
            apply_value_overrides(cfg, value_ov)
        except Exception:  # noqa: BLE001 - an unusual override: compose this job on its own
            try:
                cfg = _compose(conf_dir, list(job))
            except Exception as e:  # noqa: BLE001
                yield job, e
                continue
        yield job, cfg


def check_jobs(argv_overrides: list[str], conf_dir: Path, multirun: bool) -> int:
    """Check every job the command would launch; return the number of jobs, or raise ConfigError
    naming each bad one (its number and overrides, as Hydra numbers them) with what to do."""
    from dvlm_exp.evaluation.task_data import TaskDataError, check_task_data
    from dvlm_exp.run.validate import check, check_weight_files

    jobs = expand(argv_overrides, conf_dir, multirun)
    bad: list[str] = []
    seen_models: dict[tuple, str | None] = {}
    seen_tasks: dict[tuple, str | None] = {}
    for num, (job, cfg) in enumerate(job_configs(jobs, conf_dir)):
        if isinstance(cfg, Exception):
            err = f"{type(cfg).__name__}: {str(cfg).strip().splitlines()[0] if str(cfg).strip() else ''}"
        else:
            err = None
            try:
                check(cfg, data=False, weights=False)
                if cfg.model.get("tiny") is None:
                    mkey = (str(cfg.model.name), str(cfg.model.get("path")))
                    if mkey not in seen_models:
                        try:
                            check_weight_files(cfg)
                            seen_models[mkey] = None
                        except ConfigError as e:
                            seen_models[mkey] = str(e)
                    err = seen_models[mkey]
                tkey = (str(cfg.task.name), str(cfg.task.get("lmms_task")), str(cfg.task.get("dataset_path")))
                if err is None:
                    if tkey not in seen_tasks:
                        try:
                            check_task_data(cfg)
                            seen_tasks[tkey] = None
                        except TaskDataError as e:
                            seen_tasks[tkey] = str(e)
                    err = seen_tasks[tkey]
            except ConfigError as e:
                err = str(e)
        if err is not None:
            bad.append(f"job #{num} ({' '.join(job) or 'no overrides'}): {err}" if multirun else err)
    if bad:
        if not multirun:
            raise ConfigError(bad[0])
        listed = bad[:_MAX_LISTED] + ([f"... and {len(bad) - _MAX_LISTED} more"] if len(bad) > _MAX_LISTED else [])
        raise ConfigError(f"{len(bad)} of {len(jobs)} jobs of the multirun are invalid, so none was started "
                          f"(fix or drop those values and run the same command again):\n  " + "\n  ".join(listed))
    return len(jobs)


# ---- the jobs that failed while running -------------------------------------------------------

_STATE: dict = {}


class FailedJobs(Callback):
    """Remembers the multirun's sweep dir and start time (driver process), for failed_jobs_message."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            _STATE["sweep_dir"] = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        except Exception:  # noqa: BLE001 - cannot resolve here: no summary, Hydra's message remains
            return
        _STATE["start"] = time.time() - 1.0


def failed_jobs_message() -> str | None:
    """`error: N jobs of the multirun failed: ...` naming each job dir holding a failed.json written
    since this multirun started (None when none did, or outside a multirun)."""
    from dvlm_exp.run.resume import FAILED

    root, start = _STATE.get("sweep_dir"), _STATE.get("start")
    if root is None or not root.is_dir():
        return None
    rows = []
    for f in sorted(root.glob(f"*/{FAILED}"), key=lambda p: _job_num(p.parent.name)):
        try:
            if f.stat().st_mtime < start:
                continue
            error = str(json.loads(f.read_text()).get("error", "")).splitlines()[0]
        except (OSError, ValueError, IndexError):
            error = "(failed.json unreadable)"
        rows.append(f"{f.parent.name}: {error} ({f})")
    if not rows:
        return None
    return f"error: {len(rows)} job(s) of the multirun failed (the others ran):\n  " + "\n  ".join(rows)


def _job_num(name: str) -> int:
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


_SKIP_FLAGS = ("help", "hydra_help", "shell_completion", "info", "experimental_rerun", "cfg",
               "config_path", "config_name", "config_dir")


def command_jobs_check(argv: list[str], conf_dir: Path) -> None:
    """run.py's entry: `check_jobs` on the command line's overrides (single run or `-m`); flags that
    only print (--help, --cfg, --info, ...) are left to Hydra, and so is anything unforeseen."""
    import contextlib
    import io

    if "--version" in argv:
        return
    try:
        from hydra._internal.utils import get_args_parser

        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except (ImportError, SystemExit):
        return
    if any(getattr(args, flag, None) for flag in _SKIP_FLAGS):
        return
    try:
        check_jobs(list(args.overrides), conf_dir, multirun=bool(args.multirun))
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - Hydra composes again and reports it itself
        return
