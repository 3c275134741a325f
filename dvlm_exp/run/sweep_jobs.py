"""Dry run of a paper-table sweep: every job's overrides and the job count, nothing run.

    python scripts/sweep_jobs.py                      # list the sweeps (sweeps/sweep/*.yaml) with their job counts
    python scripts/sweep_jobs.py study_table1         # the 96 jobs of `python run.py -m +sweep=study_table1`
    python scripts/sweep_jobs.py study_table1 task=mme,pope model.path=/data/LLaDA-V --check

Positional arguments after the sweep name are the extra command-line overrides of the real command
(`python run.py -m +sweep=<name> <overrides>`); a swept key given there replaces the sweep's axis, as in
Hydra. The jobs come from Hydra's own BasicSweeper expansion (`hydra.sweeper.params` of the composed sweep,
then the command-line overrides, cartesian product), in launch order: job i runs in
`<hydra.sweep.dir>/<i>_<overrides>`. `--check` also composes every job's config and runs
`dvlm_exp.run.validate.check(cfg, data=False)` on it (model=llada_v needs model.path=<dir with config.json>);
a failing job prints its `error:` and the exit code is 1. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]  # the checkout

SWEEPS = _REPO / "sweeps"
SWEEP_GROUP = SWEEPS / "sweep"
# conf/config.yaml names sweeps/ relative to the working directory (run.py runs from the repo root);
# this script composes from anywhere by naming it absolutely.
SEARCHPATH = f"hydra.searchpath=[file://{SWEEPS}]"


def list_sweeps() -> list[str]:
    """Sweep names: sweeps/sweep/<name>.yaml, files starting with "_" (shared parts) excluded."""
    return sorted(p.stem for p in SWEEP_GROUP.glob("*.yaml") if not p.name.startswith("_"))


def header(name: str) -> dict[str, str]:
    """The sweep file's header comment fields (`# Paper:`, `# Command:`, `# Jobs:`, `# Dry run:`)."""
    out: dict[str, str] = {}
    key = None
    for line in (SWEEP_GROUP / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*(Paper|Command|Jobs|Dry run):\s*(.*)", line)
        if m:
            key = m.group(1).lower()
            out[key] = m.group(2).strip()
        elif key == "paper" and re.match(r"#\s{4,}\S", line):  # continuation lines of Paper
            out[key] += " " + line.lstrip("#").strip()
        else:
            key = None
    return out


def compose(overrides: list[str], hydra: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dvlm_exp.run.build import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*overrides, SEARCHPATH], return_hydra_config=hydra)


def _check_name(name: str) -> None:
    if name not in list_sweeps():
        raise SystemExit(f"error: unknown sweep {name!r}; sweeps: {', '.join(list_sweeps())} (sweeps/sweep/*.yaml)")


def expand(name: str, overrides: list[str] | None = None) -> tuple[list[list[str]], dict[str, int]]:
    """(jobs, grid): each job's override list as Hydra's BasicSweeper hands it to the launcher, and the
    number of values of each swept key. The sweep is composed with the command line's own overrides
    (swept values included, as `run.py -m` does for the multirun config) to read `hydra.sweeper.params`."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    _check_name(name)
    args = [f"+sweep={name}", *(overrides or [])]
    parser = OverridesParser.create()
    # the multirun's first composition sees swept command-line values as plain strings: compose with the
    # first value of each, which is enough to read the sweeper params
    first = []
    for o in parser.parse_overrides(args):
        first.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
                     else o.input_line)
    cfg = compose(first, hydra=True)
    params = cfg.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + args  # BasicSweeper.sweep: params first, then arguments
    parsed = parser.parse_overrides(lines)
    jobs = [list(j) for batch in BasicSweeper.split_arguments(parsed, None) for j in batch]
    grid: dict[str, int] = {}
    for o in parsed:
        grid[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    return jobs, {k: n for k, n in grid.items() if n > 1 or k in params}


def job_configs(jobs: list[list[str]], extra: list[str] | None = None):
    """Yield (job, cfg or exception) for every job, composed as its launched process would compose it.

    Composition is slow (~0.2-0.5 s), so jobs that choose the same config-group options share one Hydra
    composition and their plain value overrides (ratio=0.25, prune.layer=8, schedule.frac=0.5) are then
    applied the way Hydra applies them after the defaults list (OmegaConf.update on the struct config)."""
    from copy import deepcopy

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dvlm_exp.run.sweep_check import apply_value_overrides

    parser = OverridesParser.create()
    groups = _groups()
    cache: dict[tuple, object] = {}
    for job in jobs:
        group_ov, value_ov = [], []
        for o in parser.parse_overrides([*job, *(extra or [])]):
            is_group = o.key_or_group in groups or o.key_or_group.startswith("hydra")
            (group_ov if is_group or o.is_delete() else value_ov).append(o)
        key = tuple(o.input_line for o in group_ov)
        try:
            if key not in cache:
                try:
                    cache[key] = compose(list(key))
                except Exception as e:  # noqa: BLE001
                    cache[key] = e
            if isinstance(cache[key], Exception):
                raise cache[key]
            cfg = deepcopy(cache[key])
            apply_value_overrides(cfg, value_ov)
            yield job, cfg
        except Exception as e:  # noqa: BLE001 - reported per job
            yield job, e


def _groups() -> set[str]:
    from dvlm_exp.run.build import CONF_DIR

    return {p.name for root in (CONF_DIR, SWEEPS) for p in root.iterdir() if p.is_dir() and p.name != "hydra"}


def check_config(cfg) -> str | None:
    """None when cfg passes dvlm_exp.run.validate.check(cfg, data=False, weights=False) (a dry run needs only
    config.json), else the error (composition errors too)."""
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    if isinstance(cfg, Exception):
        return f"{type(cfg).__name__}: {cfg}"
    try:
        check(cfg, data=False, weights=False)
    except ConfigError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", nargs="?", help="sweep name (sweeps/sweep/<name>.yaml); none: list the sweeps")
    ap.add_argument("overrides", nargs="*", help="extra command-line overrides of `python run.py -m +sweep=<name> ...`")
    ap.add_argument("--check", action="store_true", help="compose and validate every job (no data check)")
    args = ap.parse_args(argv)

    if not args.sweep:
        rows = []
        for name in list_sweeps():
            jobs, grid = expand(name)
            h = header(name)
            rows.append({"sweep": name, "jobs": len(jobs), "grid": grid, "paper": h.get("paper", "")})
            print(f"{name:22s} {len(jobs):4d} jobs  {' x '.join(f'{k} {n}' for k, n in grid.items())}")
            print(f"{'':22s} {h.get('paper', '')[:110]}")
        print(json.dumps({"sweeps": rows, "total_jobs": sum(r["jobs"] for r in rows)}))
        return 0

    jobs, grid = expand(args.sweep, args.overrides)
    command = " ".join(["python run.py -m", f"+sweep={args.sweep}", *args.overrides])
    print(f"{args.sweep}: {len(jobs)} jobs = {' x '.join(f'{k} {n}' for k, n in grid.items())}")
    print(f"command: {command}")
    errors = 0
    width = len(str(len(jobs) - 1))
    configs = job_configs(jobs) if args.check else ((job, None) for job in jobs)
    for i, (job, cfg) in enumerate(configs):
        line = f"  {i:>{width}d}  {' '.join(job)}"
        if args.check:
            err = check_config(cfg)
            if err is not None:
                errors += 1
                line += f"\n  {'':>{width}s}  error: {err}"
        print(line)
    print(json.dumps({"sweep": args.sweep, "jobs": len(jobs), "grid": grid, "command": command,
                      "checked": bool(args.check), "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
