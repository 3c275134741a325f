"""Analysis figures: attention across layers and denoising steps, confidence dynamics,
visual-token contributions, and which visual tokens a method kept (dvlm_exp/analysis/).

    python scripts/analyze.py limit=2                                   # tiny model, synthetic DocVQA
    python scripts/analyze.py limit=1 prune=fastv prune.layer=2         # + what FastV kept
    python scripts/analyze.py model=llada_v model.path=/data/LLaDA-V task=docvqa_val limit=4 prune=fastv prune.layer=20
    python scripts/analyze.py limit=2 analysis.steps=[0,7,15] analysis.overlay=1 --out /tmp/ana
    python scripts/analyze.py analysis.remake=outputs/analysis/<date>/<time>   # redraw from analysis.json

Arguments are run.py's Hydra overrides (same conf/, same groups and keys: model, prune, ratio,
schedule, task, limit, seed, logger=wandb) plus `analysis.*` (written with or without the
leading `+`): out, steps, overlay, overlay_steps, contributions, contrib_threshold, remake
(docs/analysis.md). Output: `outputs/analysis/<date>/<time>/` (or `--out DIR`): PNG figures,
CSV tables, analysis.json (raw per-sample numbers, enough to redraw), summary.json. The last
stdout line is the JSON summary.
"""

from __future__ import annotations

import sys
from pathlib import Path


import hydra
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # run.py's config
DEFAULT_RUN_DIR = "hydra.run.dir=outputs/analysis/${now:%Y-%m-%d}/${now:%H-%M-%S}"


def rewrite_argv(argv: list[str]) -> list[str]:
    """`--out DIR` -> run dir + analysis.out; `analysis.k=v` -> `+analysis.k=v` (the key is not in
    conf/config.yaml); the analysis run dir unless one is given."""
    out, args, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--out" and i + 1 < len(argv):
            out, i = argv[i + 1], i + 2
            continue
        if a.startswith("--out="):
            out, i = a.split("=", 1)[1], i + 1
            continue
        args.append("+" + a if a.startswith("analysis.") else a)
        i += 1
    if out is not None:
        args += [f"hydra.run.dir={out}", f"+analysis.out={out}"]
    if not any(a.startswith(("hydra.run.dir=", "-m", "--multirun", "--help", "-h", "--cfg", "--info", "-c"))
               for a in args):
        args.append(DEFAULT_RUN_DIR)
    return args


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig):
    from dvlm_exp.analysis import main as analysis_main

    analysis_main(cfg)


def main() -> int:
    sys.argv = sys.argv[:1] + rewrite_argv(sys.argv[1:])
    _hydra_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
