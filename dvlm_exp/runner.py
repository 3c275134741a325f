"""The job: config -> model, method, schedule, engine -> lmms-eval -> results.json (+ W&B).

run.py is a thin @hydra.main wrapper around `main`. Heavy imports (torch, lmms-eval) happen
inside the functions that need them, after the config has been checked.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dvlm_exp import distributed
from dvlm_exp import judge as judging
from dvlm_exp import loyalty
from dvlm_exp import record as rec_io
from dvlm_exp import resume
from dvlm_exp.models.checkpoint import CheckpointError
from dvlm_exp.paths import cache_dir
from dvlm_exp.validate import ConfigError, check

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Jobs of one process (Hydra's basic launcher) that share a model config reuse the weights.
_MODEL_CACHE: dict = {}


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The same config run.py would see, for tests, the lmms-eval CLI and scripts."""
    from hydra import compose, initialize_config_dir

    overrides = list(overrides or [])
    if not any(o.startswith("hydra.searchpath") for o in overrides):  # sweeps/ from any working directory
        overrides.append(f"hydra.searchpath=[file://{CONF_DIR.parent / 'sweeps'}]")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def model_path(cfg: DictConfig) -> Path:
    m = cfg.model
    if m.get("tiny") is not None and m.get("tiny_writer"):  # another family's tiny writer (e.g. tiny_llava)
        import importlib

        writer = importlib.import_module(str(m.tiny_writer))
        return writer.ensure_checkpoint(cache_dir() / "models", OmegaConf.to_container(m.tiny), seed=int(m.get("init_seed", 0)))
    if m.get("tiny") is not None:
        from dvlm_exp.models.tiny import ensure_checkpoint

        return ensure_checkpoint(cache_dir() / "models", OmegaConf.to_container(m.tiny), seed=int(m.get("init_seed", 0)))
    from dvlm_exp.paths import resolve_path

    return resolve_path(m.path)


def model_fingerprint(cfg: DictConfig) -> str | None:
    """resume.weights_fingerprint of the model's checkpoint folder; None when it cannot be
    resolved yet (bad input is reported by `check`, with a message saying what to do)."""
    try:
        return resume.weights_fingerprint(model_path(cfg))
    except Exception:  # noqa: BLE001 - a missing or bad path fails later, in check(), with its own message
        return None


def load_model(cfg: DictConfig):
    from dvlm_exp.registry import MODEL_FAMILIES

    m = cfg.model
    path = model_path(cfg)
    key = (m.family, str(path), m.dtype, m.device, bool(m.get("resize_vocab", True)))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # keep at most one model in memory
        family = MODEL_FAMILIES.get(m.family)
        _MODEL_CACHE[key] = family.from_pretrained(path, dtype=m.dtype, device=m.device,
                                                   resize_vocab=bool(m.get("resize_vocab", True)))
    return _MODEL_CACHE[key]


def build_pruner(cfg: DictConfig):
    from dvlm_exp.registry import PRUNERS

    p = OmegaConf.to_container(cfg.prune, resolve=True)
    name = p.pop("name")
    p.pop("position_ids", None)
    return PRUNERS.get(name)(ratio=float(cfg.ratio), seed=int(cfg.seed), **p)


def build_schedule(cfg: DictConfig):
    from dvlm_exp.registry import SCHEDULES

    s = OmegaConf.to_container(cfg.schedule, resolve=True)
    return SCHEDULES.get(s.pop("name"))(**s)


def build_generator(cfg: DictConfig):
    from dvlm_exp.generator import GenPreset, Generator

    check(cfg)
    model = load_model(cfg)
    g = OmegaConf.to_container(cfg.task.gen, resolve=True)
    preset = GenPreset(**g)
    return Generator(model, build_pruner(cfg), build_schedule(cfg), preset,
                     position_ids=cfg.prune.get("position_ids", "keep"), seed=int(cfg.seed),
                     sampler_kwargs=OmegaConf.to_container(cfg.model.sampler, resolve=True)
                     if cfg.model.get("sampler") else None,  # e.g. LaViDa-Dream's alg (conf/model/lavida_dream.yaml)
                     prefix_cache=cfg.model.get("prefix_cache", False))  # LaViDa Prefix-DLM (engine/prefix.py)


def task_entry(cfg: DictConfig) -> dict:
    t = cfg.task
    if t.get("synthetic") is not None:
        import importlib

        s = t.synthetic  # generated on first use by its module's ensure(dir, n, seed) (default: synth_docvqa)
        data_mod = importlib.import_module(s.get("module") or "dvlm_exp.data.synth_docvqa")
        data = data_mod.ensure(cache_dir() / "data" / f"{t.lmms_task}-n{s.n}-s{s.seed}", n=int(s.n), seed=int(s.seed))
        return data_mod.task_entry(data)
    # Real benchmarks: the registered lmms-eval task (built-in or dvlm_exp/tasks), re-pointed at a
    # local mirror of its HF dataset repo when task.dataset_path is set (ecosystem.md §4.2; the
    # mirror was checked by validate.check_task_data before the model loaded).
    entry = {"task": t.lmms_task}
    if t.get("dataset_path"):
        import os

        entry["dataset_path"] = os.path.abspath(os.path.expanduser(str(t.dataset_path)))
    return entry


def evaluate(cfg: DictConfig, generator, predict_only: bool | None = None) -> tuple[dict, list]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import get_datetime_str

    from dvlm_exp.lmms_adapter import DvlmLMM
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
    from dvlm_exp import flops

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


def summary_text(rec: dict, path: Path) -> str:
    c = rec["config"]
    prune = c["prune"]["name"]
    how = "" if prune == "none" else f"(layer={c['prune'].get('layer')}, ratio={c['ratio']})"
    metrics = ", ".join(f"{k.split(',')[0]}={v:.4f}" for k, v in rec["metrics"].items()
                        if isinstance(v, (int, float)) and "stderr" not in k)
    f, t, tok = rec["flops"], rec["timing"], rec["tokens"]
    vis = tok["visual_per_sample"]
    vis_avg = sum(vis) / len(vis) if vis else 0
    return "\n".join([
        f"dvlm_exp | model={c['model']['name']} prune={prune}{how} task={rec['task']} samples={rec['n_samples']}",
        f"  accuracy  {metrics}",
        f"  FLOPs     {f['total'] / 1e9:.3f} GFLOP vs baseline {f['baseline_total'] / 1e9:.3f} GFLOP "
        f"-> reduction {100 * f['reduction']:.1f}% ({f['convention']})",
        f"  latency   {t['latency_s_per_sample']:.3f} s/sample, {t['tokens_per_s']:.1f} tok/s, NFE {t['nfe']:.1f}",
        f"  visual    {vis_avg:.0f} tokens/sample, {tok['visual_kept_avg']:.0f} kept after pruning",
        *[ln for ln in (judging.summary_line(rec, Path(path).parent), loyalty.summary_line(rec)) if ln],
        f"  results   {path}",
    ])


def baseline_predictions(cfg: DictConfig, generator) -> list[dict]:
    """The unpruned predictions of cfg's task (dvlm_exp.loyalty): the same task, limit, seed and preset
    with prune=none, in-process on the already loaded model, lmms-eval predict-only (no judge)."""
    from dvlm_exp.generator import Generator

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
            from dvlm_exp.wandb_log import WandbSink

            sink = WandbSink(cfg, OmegaConf.to_container(cfg, resolve=True), run_dir)
        t0 = time.perf_counter()
        generator = build_generator(cfg)
        # per-sample journal: a requeued/resubmitted job continues where it stopped (dvlm_exp.resume)
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
        record["judge"] = judging.record_info(cfg, judge_cfg, judge, predictions)  # null: no judge (predict-only)
        if dist.active:
            distributed.annotate(record, dist, per_rank)
        if cfg.get("loyalty"):
            record["loyalty"] = loyalty.compute(cfg, predictions, lambda: baseline_predictions(cfg, generator))
        if sink is not None:
            sink.log_record(record, predictions)
            record["wandb"] = {"mode": sink.mode, "dir": str(run_dir / "wandb"), "run_id": sink.run.id}
        rec_io.write_atomic(run_dir / "predictions.jsonl", "".join(json.dumps(p, default=str) + "\n" for p in predictions))
        path = rec_io.write_results(run_dir, record)
        resume.clear_failed(run_dir)
        if journal.replayed:
            print(journal.summary(), flush=True)
        journal.remove()
        print(summary_text(record, path), flush=True)
        exit_code = 0
        return record
    finally:
        if sink is not None:
            sink.finish(exit_code)


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
            return _job(cfg, run_dir, journal, in_submitit)
    except resume.RunDirBusy as e:  # nothing in run_dir is touched: it belongs to the other run
        print(f"error: {e}", file=sys.stderr, flush=True)
        if one_run:
            sys.exit(2)
        if in_submitit:
            resume.exit_nonzero_at_exit(2)
        raise
    except (resume.Interrupted, KeyboardInterrupt) as e:  # no record: the same command resumes
        print(f"error: {journal.interrupted_message(e)}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code if isinstance(e, resume.Interrupted) else 130)
    except rec_io.WriteError as e:  # read-only or full disk: one line, not a chain of tracebacks
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


def _job(cfg: DictConfig, run_dir: Path, journal: resume.SampleJournal, in_submitit: bool) -> float | None:
    done = resume.completed(run_dir, cfg, lambda: model_fingerprint(cfg))
    if done is not None:  # a re-launched sweep only re-runs unfinished jobs
        print(f"skip: {run_dir} already complete", flush=True)
        return _main_metric(done)
    if in_submitit:
        _limit_threads()
    try:
        record = run(cfg, run_dir, journal)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        resume.write_failed(run_dir, e, cfg)
        if in_submitit:  # SystemExit would leave submitit without a result: let Hydra mark the job failed
            resume.exit_nonzero_at_exit()
            raise
        sys.exit(2)
    except rec_io.WriteError:
        raise  # main() reports it
    except Exception as e:  # recorded, then re-raised: Hydra reports the job failed, the multirun exits non-zero
        try:
            details = f"details: {resume.write_failed(run_dir, e, cfg)}"
        except rec_io.WriteError as w:  # say what failed, not only that failed.json could not be written
            details = f"no failed.json: {w}"
        if in_submitit:
            resume.exit_nonzero_at_exit()
        print(f"error: job failed: {type(e).__name__}: {e} ({details})", file=sys.stderr, flush=True)
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
