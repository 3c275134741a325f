"""The job: config -> model, method, schedule, engine -> lmms-eval -> results.json (+ W&B).

run.py is a thin @hydra.main wrapper around `main`. Heavy imports (torch, lmms-eval) happen
inside the functions that need them, after the config has been checked.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dvlm_exp.evaluation import judge as judging
from dvlm_exp.evaluation import loyalty
from dvlm_exp.run import distributed
from dvlm_exp.run import record as rec_io
from dvlm_exp.run import resume
from dvlm_exp.models.checkpoint import CheckpointError
from dvlm_exp.errors import ConfigError
from dvlm_exp.run.build import CONF_DIR, build_generator, build_pruner, build_schedule, model_fingerprint, task_entry
from dvlm_exp.run.validate import check

def evaluate(cfg: DictConfig, generator, predict_only: bool | None = None) -> tuple[dict, list]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import get_datetime_str

    from dvlm_exp.evaluation.lmms_adapter import DvlmLMM
    from dvlm_exp.tasks import TASKS_DIR

    lm = DvlmLMM(generator=generator, progress=bool(cfg.get("progress", True)),
                 max_frames_num=(cfg.task.get("video") or {}).get("max_frames"))  # task.video.max_frames
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(cfg.task.get("builtin", False)))
    if predict_only is None:  # lmms-eval's own judge code without a judge: keep predictions, skip scoring
        predict_only = judging.lmms_predict_only(cfg)
    res = simple_evaluate(**distributed.evaluate_kwargs(),  # several ranks: lmms-eval's own sharding
        model=lm, tasks=[task_entry(cfg)], task_manager=tm, limit=cfg.limit, bootstrap_iters=0,
        log_samples=True, predict_only=predict_only, datetime_str=get_datetime_str(), random_seed=int(cfg.seed),
        numpy_random_seed=int(cfg.seed), torch_random_seed=int(cfg.seed), fewshot_random_seed=int(cfg.seed),
    )
    return res, lm.predictions


def _peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb * 1024) if platform.system() != "Darwin" else int(kb)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("dvlm_exp", "torch", "transformers", "lmms_eval", "hydra-core", "wandb", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def build_record(cfg: DictConfig, generator, res: dict, predictions: list, wall_s: float) -> dict:
    from dvlm_exp.reporting import flops

    task = cfg.task.lmms_task
    samples = generator.recorder.samples
    metrics = {k: v for k, v in res["results"][task].items() if k != "alias"}
    lmms_samples = {s["doc_id"]: s for s in res.get("samples", {}).get(task, [])}
    for p in predictions:
        s = lmms_samples.get(p["doc_id"])
        if s is not None:
            p["target"] = s.get("target")
            if isinstance(s.get("doc"), dict) and s["doc"].get("question") is not None:
                p["question"] = s["doc"]["question"]  # for scripts/judge.py
            p.update({k.split(",")[0]: v for k, v in s.items() if k in metrics or k.split(",")[0] + ",none" in metrics})
    n = len(samples)
    gen_tokens = sum(s.generated_tokens for s in samples)
    latency = sum(s.latency_s for s in samples)
    kept_final = [s.visual_kept[-1] if s.visual_kept else 0 for s in samples]  # seen by the last layer call
    layer_avg = [sum(s.visual_kept) / len(s.visual_kept) if s.visual_kept else 0 for s in samples]
    return {
        "task": task,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "metrics": metrics,
        "n_samples": n,
        "flops": flops.summarize(samples, generator.model.dims()),
        "tokens": {
            "visual_per_sample": [s.n_visual for s in samples],
            "visual_kept_per_sample": kept_final,
            "visual_kept_avg": sum(kept_final) / n if n else 0.0,
            "visual_layer_avg": sum(layer_avg) / n if n else 0.0,
            "generated_per_sample": [s.generated_tokens for s in samples],
        },
        "timing": {
            "latency_s_per_sample": latency / n if n else 0.0,
            "tokens_per_s": gen_tokens / latency if latency else 0.0,
            "nfe": sum(s.n_forwards for s in samples) / n if n else 0.0,
            "scoring_s_per_sample": sum(s.scoring_s for s in samples) / n if n else 0.0,
            "wall_s": wall_s,
        },
        "memory": {"peak_bytes": _peak_memory_bytes()},
        "generation": OmegaConf.to_container(cfg.task.gen, resolve=True),
        "versions": _versions(),
    }


def prune_preset(cfg: DictConfig) -> dict:
    """Which prune preset ran and how it differs from its method's own defaults (conf/prune/<method>.yaml):
    `{"preset": "sandbox_fastv", "method": "fastv", "non_default": {"query_set": "masked_response"}}`.
    The preset is Hydra's choice (`prune=...`, conf/prune/ or sweeps/prune/); outside Hydra, the method."""
    method = str(cfg.prune.name)
    preset = method
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            preset = str(HydraConfig.get().runtime.choices.get("prune") or method)
    except Exception:  # noqa: BLE001 - no Hydra context: the method's name
        pass
    defaults_file = CONF_DIR / "prune" / f"{method}.yaml"
    defaults = OmegaConf.to_container(OmegaConf.load(defaults_file)) if defaults_file.is_file() else {}
    defaults.pop("defaults", None)
    ran = OmegaConf.to_container(cfg.prune, resolve=True)
    non_default = {k: v for k, v in ran.items() if k not in defaults or defaults[k] != v}
    return {"preset": preset, "method": method, "non_default": non_default}


def _prune_text(c: dict, info: dict | None) -> str:
    """`prune=sandbox_fastv (fastv; non-default query_set=masked_response; layer=2, ratio=0.1)`."""
    prune = c["prune"]["name"]
    info = info or {"preset": prune, "method": prune, "non_default": {}}
    parts = []
    if info["preset"] != prune:
        parts.append(prune)
    nd = info.get("non_default") or {}
    parts.append("non-default " + ", ".join(f"{k}={v}" for k, v in nd.items()) if nd else "method defaults")
    if prune != "none":
        parts.append(f"layer={c['prune'].get('layer')}, ratio={c['ratio']}")
    return f"{info['preset']} ({'; '.join(parts)})"


def summary_text(rec: dict, path: Path) -> str:
    c = rec["config"]
    prune = _prune_text(c, rec.get("prune_preset"))
    metrics = ", ".join(f"{k.split(',')[0]}={v:.4f}" for k, v in rec["metrics"].items()
                        if isinstance(v, (int, float)) and "stderr" not in k)
    f, t, tok = rec["flops"], rec["timing"], rec["tokens"]
    vis = tok["visual_per_sample"]
    vis_avg = sum(vis) / len(vis) if vis else 0
    return "\n".join([
        f"dvlm_exp | model={c['model']['name']} prune={prune} task={rec['task']} samples={rec['n_samples']}",
        f"  accuracy  {metrics}",
        f"  FLOPs     {f['total'] / 1e9:.3f} GFLOP vs baseline {f['baseline_total'] / 1e9:.3f} GFLOP "
        f"-> reduction {100 * f['reduction']:.1f}% ({f['convention']})",
        f"  latency   {t['latency_s_per_sample']:.3f} s/sample, {t['tokens_per_s']:.1f} tok/s, NFE {t['nfe']:.1f}",
        f"  visual    {vis_avg:.0f} tokens/sample, {tok['visual_kept_avg']:.0f} kept after pruning",
        *[ln for ln in (judging.summary_line(rec, Path(path).parent), loyalty.summary_line(rec)) if ln],
        f"  results   {path}",
    ])


def baseline_predictions(cfg: DictConfig, generator) -> list[dict]:
    """The unpruned predictions of cfg's task (dvlm_exp.evaluation.loyalty): the same task, limit, seed and preset
    with prune=none, in-process on the already loaded model, lmms-eval predict-only (no judge)."""
    from dvlm_exp.decoding.generator import Generator

    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    base.prune = OmegaConf.load(CONF_DIR / "prune" / "none.yaml")
    gen = Generator(generator.model, build_pruner(base), build_schedule(base), generator.preset,
                    position_ids=base.prune.get("position_ids", "keep"), seed=int(base.seed))
    with judging.activate(None):
        _, predictions = evaluate(base, gen, predict_only=True)
    return predictions


def run(cfg: DictConfig, run_dir: Path, journal: resume.SampleJournal | None = None) -> dict:
    """Run one job into run_dir; returns the record. Nothing but the per-sample journal (`journal`,
    default: cfg's in run_dir) is written unless it completes."""
    check(cfg)
    distributed.check(cfg)
    judge_cfg = judging.preflight(cfg)  # a configured judge must answer before any weight loads
    sink = None
    exit_code = 1
    try:
        dist = distributed.setup(cfg, run_dir)  # several ranks (torchrun, SLURM tasks): rank 0 writes
        if cfg.logger.name == "wandb" and dist.main:
            from dvlm_exp.run.wandb_log import WandbSink

            sink = WandbSink(cfg, OmegaConf.to_container(cfg, resolve=True), run_dir)
        t0 = time.perf_counter()
        generator = build_generator(cfg)
        # per-sample journal: a requeued/resubmitted job continues where it stopped (dvlm_exp.run.resume)
        if journal is None:
            journal = resume.SampleJournal(run_dir, cfg, enabled=bool(cfg.get("resume_cache", True)))
        journal.attach(generator)
        with judging.session(cfg, judge_cfg) as judge:
            res, predictions = evaluate(cfg, generator)
        if dist.active:  # every rank's predictions and sample records to rank 0; the others are done
            stats = {"wall_s": time.perf_counter() - t0, "peak_bytes": _peak_memory_bytes(),
                     "replayed": journal.replayed, "generated": journal.generated,
                     "judge_calls": [judge.n_requests, judge.n_failed] if judge is not None else None}
            gathered = distributed.gather(dist, generator, predictions, stats)
            if gathered is None:
                if journal.replayed:
                    print(f"rank {dist.rank}: {journal.summary()}", flush=True)
                exit_code = 0
                return None
            predictions, per_rank = gathered
        record = build_record(cfg, generator, res, predictions, time.perf_counter() - t0)
        record["model_fingerprint"] = model_fingerprint(cfg)  # resume.completed: same config, same weights
        record["prune_preset"] = prune_preset(cfg)  # which preset ran, and what differs from its method's defaults
        record["judge"] = judging.record_info(cfg, judge_cfg, judge, predictions)  # null: no judge (predict-only)
        if dist.active:
            distributed.annotate(record, dist, per_rank)
        if cfg.get("loyalty"):
            record["loyalty"] = loyalty.compute(cfg, predictions, lambda: baseline_predictions(cfg, generator))
        if sink is not None:
            sink.log_record(record, predictions)
            record["wandb"] = {"mode": sink.mode, "dir": str(run_dir / "wandb"), "run_id": sink.run.id, "group": sink.group}
        rec_io.write_atomic(run_dir / "predictions.jsonl", "".join(json.dumps(p, default=str) + "\n" for p in predictions))
        path = rec_io.write_results(run_dir, record)
        resume.clear_failed(run_dir)
        if journal.replayed:
            say(journal.summary())
        journal.remove()
        say(summary_text(record, path))
        exit_code = 0
        return record
    finally:
        if sink is not None:
            sink.finish(exit_code)


def say(msg: str, err: bool = False) -> None:
    """A line for the user: stdout (stderr for `err`) and, under Hydra, the run's run.log too
    (the loggers of conf/hydra/job_logging/dvlm.yaml); a plain print elsewhere (tests, scripts)."""
    lg = logging.getLogger("dvlm_exp.say_err" if err else "dvlm_exp.say")
    if lg.handlers:
        (lg.error if err else lg.info)(msg)
    else:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def main(cfg: DictConfig) -> float | None:
    """Entry for run.py: one run per run dir, one-line errors for bad input, interruptions and
    unwritable files, the main metric as return value."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
    distributed.launch_env()  # a SLURM job of several tasks: RANK, WORLD_SIZE, ... from submitit
    one_run = hc.mode == RunMode.RUN and not in_submitit  # else: fail this job, let the others run
    journal = resume.SampleJournal(run_dir, cfg, enabled=bool(cfg.get("resume_cache", True)))
    try:
        # a requeued SLURM job may start while its previous attempt is still exiting: wait a little
        with resume.RunDirLock(run_dir, hc.overrides.task, wait_s=60 if in_submitit else 0), \
                resume.interrupts_raise(term=not in_submitit):
            return _job(cfg, run_dir, journal, in_submitit, one_run)
    except resume.RunDirBusy as e:  # nothing in run_dir is touched: it belongs to the other run (not its run.log)
        print(f"error: {e}", file=sys.stderr, flush=True)
        if one_run:
            sys.exit(2)
        if in_submitit:
            resume.exit_nonzero_at_exit(2)
        raise
    except (resume.Interrupted, KeyboardInterrupt) as e:  # no record: the same command resumes
        say(f"error: {journal.interrupted_message(e)}", err=True)
        sys.exit(e.exit_code if isinstance(e, resume.Interrupted) else 130)
    except rec_io.WriteError as e:  # read-only or full disk: one line, not a chain of tracebacks (not via run.log)
        print(f"error: {e}", file=sys.stderr, flush=True)
        try:
            resume.write_failed(run_dir, e, cfg)
        except OSError:
            pass  # most likely the same disk: the line above is the report
        if one_run:
            sys.exit(1)
        if in_submitit:
            resume.exit_nonzero_at_exit()
        raise


def _job(cfg: DictConfig, run_dir: Path, journal: resume.SampleJournal, in_submitit: bool,
         one_run: bool = False) -> float | None:
    done = resume.completed(run_dir, cfg, lambda: model_fingerprint(cfg))
    if done is not None:  # a re-launched sweep only re-runs unfinished jobs
        say(f"skip: {run_dir} already complete")
        return _main_metric(done)
    if in_submitit:
        _limit_threads()
    try:
        record = run(cfg, run_dir, journal)
    except (ConfigError, CheckpointError) as e:
        say(f"error: {e}", err=True)
        if one_run:  # bad input (run.py checked the config before Hydra ran; this is what only the job sees)
            resume.discard_new_run_dir(run_dir)  # a run dir this run created holds nothing worth keeping
            sys.exit(2)
        resume.write_failed(run_dir, e, cfg)
        if in_submitit:  # SystemExit would leave submitit without a result: let Hydra mark the job failed
            resume.exit_nonzero_at_exit()
        raise  # a multirun job: failed.json, Hydra marks it failed and runs the others
    except rec_io.WriteError:
        raise  # main() reports it
    except Exception as e:  # recorded, then re-raised: Hydra reports the job failed, the multirun exits non-zero
        try:
            details = f"details: {resume.write_failed(run_dir, e, cfg)}"
        except rec_io.WriteError as w:  # say what failed, not only that failed.json could not be written
            details = f"no failed.json: {w}"
        if in_submitit:
            resume.exit_nonzero_at_exit()
        say(f"error: job failed: {type(e).__name__}: {e} ({details})", err=True)
        raise
    return _main_metric(record)


def _main_metric(record: dict | None) -> float | None:
    if record is None:  # a rank other than 0 of a multi-process job
        return None
    vals = [v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and "stderr" not in k]
    return float(vals[0]) if vals else None


def _limit_threads() -> None:
    """One job per CPU allocation: torch threads = the job's CPUs (SLURM without cgroups/affinity
    and submitit's local executor would otherwise let every job use every core)."""
    n = os.environ.get("SLURM_CPUS_PER_TASK")
    if not n:
        try:
            from hydra.core.hydra_config import HydraConfig

            n = HydraConfig.get().launcher.get("cpus_per_task")
        except Exception:  # noqa: BLE001
            n = None
    if not n or int(n) < 1:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(n))
