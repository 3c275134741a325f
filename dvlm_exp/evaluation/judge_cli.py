"""Score a finished predict-only run with an LLM judge, after the fact.

    python scripts/judge.py <run_dir> [judge.base_url=http://127.0.0.1:8000/v1] [judge.model=NAME] \
        [judge.api_key_env=OPENAI_API_KEY] [judge.timeout_s=60] [judge.max_retries=3]

Judge settings are conf/judge/openai.yaml's (DVLM_JUDGE_URL / DVLM_JUDGE_MODEL in the environment
work too) with these overrides; the API key is read from the variable named by judge.api_key_env.
Reads <run_dir>/predictions.jsonl (question, reference `target`, prediction), asks the judge for the
task's judged metric (task.judge_metric: judge_score for synth_video_caption, gpt_eval_score for
video_dc499, same prompt as lmms-eval's video_dc499), then rewrites atomically:
  predictions.jsonl  + per-sample {"score", "review"} under the metric name
  results.json       metrics["<metric>,none"] (the mean over scored samples), `judge` (endpoint, model,
                     counts; never the key), status stays complete
The last line printed is a JSON summary. Exit 2 with one `error:` line when the run or the judge
is not usable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]  # the checkout


def judge_config(overrides: list[str]):
    from omegaconf import OmegaConf

    from dvlm_exp.evaluation.judge import from_cfg
    from dvlm_exp.errors import ConfigError

    base = OmegaConf.load(_REPO / "conf" / "judge" / "openai.yaml")
    dots = []
    for o in overrides:
        key, sep, val = o.partition("=")
        if not sep or not key.startswith("judge."):
            raise ConfigError(f"override {o!r} must look like judge.<key>=<value> (e.g. judge.base_url=http://127.0.0.1:8000/v1)")
        dots.append(f"{key[len('judge.'):]}={val}")
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(dots))
    jc = from_cfg(OmegaConf.to_container(cfg, resolve=True))
    if jc is None:
        raise ConfigError("no judge endpoint: pass judge.base_url=http://host:port/v1 (or set DVLM_JUDGE_URL)")
    return jc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a complete run directory (results.json + predictions.jsonl)")
    p.add_argument("overrides", nargs="*", help="judge.<key>=<value> overrides of conf/judge/openai.yaml")
    p.add_argument("--quiet", action="store_true", help="no per-sample progress on stderr")
    args = p.parse_args(argv)

    from dvlm_exp.evaluation.judge import score_run
    from dvlm_exp.errors import ConfigError

    try:
        jc = judge_config(args.overrides)
        summary = score_run(args.run_dir, jc, progress=not args.quiet)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{summary['metric']}={summary['score']} over {summary['n']} samples "
          f"({summary['n_failed']} failed) by {summary['judge_model']} -> {Path(args.run_dir) / 'results.json'}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
