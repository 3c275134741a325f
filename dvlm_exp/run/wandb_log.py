"""W&B mirror of results.json, in the mode wandb's own settings give (`choose_mode`).

Mode: `logger.mode` when set; else WANDB_MODE; else a mode from wandb's settings files (`wandb offline`);
else online when wandb has credentials (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or `wandb login`'s
netrc entry for the server), offline files under the run dir when it has none. An online run first
asks the server who the key belongs to (`online_problem`, a few seconds at most): an unreachable server
or a rejected key gives one `warning:` line and offline files instead (a failed online wandb.init
leaves wandb's service retrying, so that no later init in the process works and the process hangs at
exit); any wandb.init failure gives one `warning:` line and a run without W&B. results.json is written
either way.

`wandb.finish()` always runs (finally block in the runner), so jobs of a multirun in one
process never leak into each other.

Grouping and naming (the same for every sweep, so runs compare across sweeps in one project):
  group  logger.group when set; else the sweep's name (`+sweep=<name>`, sweeps/sweep/<name>.yaml: cfg.sweep.name);
         else, in a multirun, the Hydra sweep dir (hydra.sweep.dir as configured); else none
  name   logger.name_ when set; else, in a multirun, "<job num>_<override dirname>" (the run dir's name)
  tags   model:<model.name> method:<prune.name> task:<task.name> schedule:<schedule.name>, plus
         preset:<prune preset> when the prune preset is not named after the method (llada_fastv, study_fastv),
         sweep:<name> for a sweep, and logger.tags
Summary keys (`summary_metrics`): score (main metric on the paper's scale, dvlm_exp.reporting.report.main_score) and
score_metric (what it is), keep_ratio / prune_start / prune_layer (the report's keys), metric/<name> (every
numeric lmms-eval metric, task-independent names), <lmms task>/<name> (lmms-eval's own naming), and
flops/*, tokens/* (+ tokens/kept_fraction), timing/*, memory/*, loyalty/* from results.json. They are the
run's summary only (run.summary), not a one-point history; the history holds the per-sample table.

Run id (`run_id`): WANDB_RUN_ID when set (wandb's own setting), else one derived from the run dir's
absolute path, so a job that runs again in its run dir (a requeued SLURM job, a re-run of a sweep) is the
same W&B run: online it resumes it (resume="allow", or WANDB_RESUME when set); offline, each attempt
writes its own offline-run-*-<id> dir with that id (wandb ignores resume offline), and `wandb sync`
uploads them into the one run.
"""

from __future__ import annotations

import os
from pathlib import Path


def flat(prefix: str, d: dict, out: dict) -> dict:
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat(key, v, out)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def samples_table(predictions: list[dict]):
    """Per-sample predictions as a wandb.Table: the union of the rows' keys as columns, nested values
    (metric items such as {"score": ..., "review": ...}, answer lists) as JSON text. wandb infers a
    column type from the rows and rejects a table whose rows disagree (a judge score null in one row
    and a number in the next), which would fail the run after all samples were generated.

    The rows are our own predictions (runner.build_record), not lmms-eval's `samples`, and nothing here
    mutates them: lmms-eval's `EvaluationTracker.save_results_samples` pops `arguments`/`doc` from the
    sample dicts it is given (ecosystem.md §5.1), but the runner never uses EvaluationTracker."""
    import json

    import wandb

    cols: list[str] = []
    for p in predictions:
        cols += [k for k in p if k not in cols]

    def kind(v):
        return "bool" if isinstance(v, bool) else "num" if isinstance(v, (int, float)) else "str" if isinstance(v, str) else "json"

    # a column keeps its plain values only when all rows agree on one scalar kind; otherwise JSON text
    kinds = {c: {kind(p[c]) for p in predictions if p.get(c) is not None} for c in cols}
    plain = {c for c in cols if len(kinds[c]) <= 1 and "json" not in kinds[c]}

    def cell(c, v):
        if v is None or c in plain:
            return v
        return json.dumps(v, default=str)

    return wandb.Table(columns=cols, data=[[cell(c, p.get(c)) for c in cols] for p in predictions])


def hydra_context() -> dict:
    """What the running Hydra job says about itself ({} outside a Hydra app, e.g. tests and lmms-eval's CLI)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        return {
            "multirun": hc.mode == RunMode.MULTIRUN,
            "sweep_dir": str(hc.sweep.dir),
            "job_num": hc.job.get("num"),
            "override_dirname": hc.job.get("override_dirname") or "",
            "choices": dict(hc.runtime.choices),
        }
    except Exception:  # noqa: BLE001 - naming must never fail a run
        return {}


def _fit(s: str, n: int = 128) -> str:
    return s if len(s) <= n else s[-n:]  # W&B caps group / name length: keep the distinctive tail


def resolve_group(cfg, hctx: dict | None = None) -> str | None:
    hctx = hydra_context() if hctx is None else hctx
    lc = cfg.logger
    if lc.get("group"):
        return str(lc.group)
    sweep = cfg.get("sweep")
    if sweep is not None and sweep.get("name"):
        return str(sweep.name)
    if hctx.get("multirun") and hctx.get("sweep_dir"):
        return _fit(hctx["sweep_dir"])
    return None


def resolve_name(cfg, hctx: dict | None = None) -> str | None:
    hctx = hydra_context() if hctx is None else hctx
    if cfg.logger.get("name_"):
        return str(cfg.logger.name_)
    if hctx.get("multirun"):
        head = f"{hctx.get('job_num')}_"
        return head + _fit(hctx.get("override_dirname") or "", 128 - len(head))
    return None


def run_tags(cfg, hctx: dict | None = None) -> list[str]:
    hctx = hydra_context() if hctx is None else hctx
    tags = [f"model:{cfg.model.name}", f"method:{cfg.prune.name}", f"task:{cfg.task.name}",
            f"schedule:{cfg.schedule.name}"]
    preset = (hctx.get("choices") or {}).get("prune")
    if preset and preset != cfg.prune.name:
        tags.append(f"preset:{preset}")
    sweep = cfg.get("sweep")
    if sweep is not None and sweep.get("name"):
        tags.append(f"sweep:{sweep.name}")
    tags += [str(t) for t in (cfg.logger.get("tags") or [])]
    return [t[:64] for t in tags]  # W&B's tag length limit


def summary_metrics(record: dict) -> dict:
    """The run summary: the same key names for every task and sweep (module docstring)."""
    from dvlm_exp.reporting.report import main_score, prune_layer, prune_start
    from dvlm_exp.reporting.report import keep_ratio as nominal_keep

    summary: dict = {}
    score, what = main_score(record)
    summary["score"] = score
    summary["score_metric"] = what
    cfg = record.get("config") or {}
    if cfg.get("prune"):
        summary["keep_ratio"] = nominal_keep(cfg)
        start = prune_start(cfg)
        summary["prune_start"] = start if start is None or isinstance(start, float) else str(start)
        layer = prune_layer(cfg)
        summary["prune_layer"] = layer if layer is None or isinstance(layer, int) else str(layer)
    task = record["task"]
    for k, v in record["metrics"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            name = k.split(",")[0]
            summary[f"metric/{name}"] = v
            summary[f"{task}/{name}"] = v
    for section in ("flops", "tokens", "timing", "memory", "loyalty"):
        if isinstance(record.get(section), dict):
            flat(section, {k: v for k, v in record[section].items() if not isinstance(v, list)}, summary)
    tok = record.get("tokens") or {}
    vis = tok.get("visual_per_sample") or []
    if vis and sum(vis):
        summary["tokens/kept_fraction"] = tok.get("visual_kept_avg", 0.0) / (sum(vis) / len(vis))
    return summary


def run_id(run_dir: Path, env=os.environ) -> str:
    """The W&B run id of the job in run_dir: WANDB_RUN_ID when set, else "dvlm-" + 20 hex digits of the
    sha1 of the run dir's absolute path (the same dir, the same run: requeues resume it)."""
    if env.get("WANDB_RUN_ID"):
        return env["WANDB_RUN_ID"]
    import hashlib

    return "dvlm-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:20]


DEFAULT_BASE_URL = "https://api.wandb.ai"
ONLINE_CHECK_TIMEOUT_S = 10.0
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older spellings


def wandb_settings() -> dict:
    """mode, base_url, api_key from wandb's own settings (env, settings files); {} if unavailable."""
    try:
        from wandb.sdk import wandb_setup

        s = wandb_setup.singleton().settings  # no service started, nothing sent
        return {"mode": s.mode, "base_url": s.base_url, "api_key": s.api_key}
    except Exception:  # noqa: BLE001 - another wandb layout: environment variables only
        return {}


def credentials(base_url: str, env=os.environ) -> str | None:
    """The API key wandb would use for base_url (env, then netrc); "" for an identity-token login
    (no key to show the server), None without credentials."""
    if env.get("WANDB_API_KEY"):
        return env["WANDB_API_KEY"]
    if env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return ""
    try:
        from wandb.sdk.lib import wbauth

        return wbauth.read_netrc_auth(host=base_url) or None
    except ImportError:
        import netrc
        from urllib.parse import urlparse

        try:
            auth = netrc.netrc(env.get("NETRC") or None).authenticators(urlparse(base_url).hostname or "")
        except (OSError, netrc.NetrcParseError):
            return None
        return auth[2] if auth else None
    except Exception:  # noqa: BLE001 - a malformed key: wandb.init says so
        return None


def choose_mode(logger_mode, env=os.environ, settings_mode: str | None = None, has_credentials: bool = False) -> str:
    """The W&B mode of a run: logger.mode when set; else WANDB_MODE; else a non-default mode of
    wandb's settings (`wandb offline` writes one); else online with credentials, offline without."""
    for explicit in (logger_mode, env.get("WANDB_MODE")):
        if explicit:
            return _MODE_ALIASES.get(str(explicit), str(explicit))
    if settings_mode and settings_mode not in ("online", "run"):
        return _MODE_ALIASES.get(settings_mode, settings_mode)
    return "online" if has_credentials else "offline"


def online_problem(base_url: str, api_key: str | None, timeout: float = ONLINE_CHECK_TIMEOUT_S) -> str | None:
    """Why an online W&B run cannot start (None: it can): the server's answer to a `viewer` query."""
    if api_key is None:
        return "wandb has no credentials (set WANDB_API_KEY or run `wandb login`)"
    import requests

    try:
        r = requests.post(f"{base_url.rstrip('/')}/graphql", json={"query": "query { viewer { id } }"},
                          auth=("api", api_key) if api_key else None, timeout=timeout)
    except requests.RequestException as e:
        return f"{base_url} is unreachable ({type(e).__name__})"
    if api_key and r.status_code in (401, 403):
        return f"{base_url} rejected the API key (HTTP {r.status_code})"
    if r.status_code >= 500 or (r.status_code >= 400 and r.status_code not in (401, 403)):
        return f"{base_url} answered HTTP {r.status_code}"
    if api_key:
        try:
            viewer = (r.json().get("data") or {}).get("viewer")
        except ValueError:
            return f"{base_url} does not answer as a W&B server"
        if viewer is None:
            return f"{base_url} rejected the API key"
    return None


def _warn(text: str) -> None:
    import sys

    print(f"warning: {text}", file=sys.stderr, flush=True)


class WandbSink:
    def __init__(self, cfg, resolved: dict, run_dir: Path):
        import wandb

        lc = cfg.logger
        ws = wandb_settings()
        base_url = ws.get("base_url") or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
        key = credentials(base_url)
        if key is None and ws.get("api_key"):
            key = ws["api_key"]
        mode = choose_mode(lc.get("mode"), os.environ, ws.get("mode"), key is not None)
        hctx = hydra_context()
        self.group = resolve_group(cfg, hctx)
        self.tags = run_tags(cfg, hctx)
        kwargs = dict(project=lc.get("project", "dvlm_exp"), entity=lc.get("entity"), group=self.group,
                      name=resolve_name(cfg, hctx), job_type=lc.get("job_type"), config=resolved, dir=str(run_dir),
                      tags=self.tags, reinit="create_new", id=run_id(run_dir))
        sync = f"`wandb sync {run_dir / 'wandb'}/offline-run-*` uploads it later"
        if mode == "online":
            problem = online_problem(base_url, key)
            if problem:
                _warn(f"W&B online logging is off for this run: {problem}; logging offline to {run_dir / 'wandb'} "
                      f"instead ({sync}; WANDB_MODE=offline or logger.mode=offline skips this check)")
                mode = "offline"
        if mode == "online":  # wandb ignores resume offline (and warns): only an online run resumes
            kwargs["resume"] = os.environ.get("WANDB_RESUME") or "allow"
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - W&B is a mirror: the run goes on, results.json is written
            first = (str(e).strip().splitlines() or [""])[0][:300]
            _warn(f"W&B {mode} init failed ({type(e).__name__}: {first}); this run continues without W&B "
                  f"(results.json is written as usual; check WANDB_API_KEY / `wandb login` and WANDB_BASE_URL, "
                  f"or use WANDB_MODE=offline)")
            mode = "disabled"
            kwargs.pop("resume", None)
            self.run = wandb.init(mode="disabled", **kwargs)
        self.mode = mode

    def log_record(self, record: dict, predictions: list[dict]) -> None:
        summary = summary_metrics(record)
        task = record["task"]
        self.run.summary.update(summary)  # the summary only: no one-point history of each value
        if predictions:
            self.run.log({f"{task}/samples": samples_table(predictions)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
