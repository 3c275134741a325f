"""Job-level resume and failure records (used by dvlm_exp.runner).

- `completed(run_dir, cfg, fingerprint)`: the run dir already holds a complete record of this
  config AND of the same weights (`weights_fingerprint`: a retrained or replaced checkpoint at
  the same `model.path` is a different job), so a re-launched sweep (same `hydra.sweep.dir=`)
  skips the job.
- `write_failed(run_dir, exc, cfg)`: `failed.json` (status failed, error, traceback) for a job
  whose Python raised; never results.json. `clear_failed` removes a stale one after a success.
- `SampleJournal`: per-sample resume inside a job (config `resume_cache: true`). Every finished
  sample's text and `SampleRecord` are written to `<run_dir>/resume_cache/<config hash>/`; a
  re-run of the same job in the same run dir (a requeue after SLURM preemption/timeout, or a
  resubmitted failed job) takes those samples from the journal instead of generating them, so
  the final record (metrics, FLOPs, tokens, predictions, per-sample latency) equals an
  uninterrupted run. The journal is removed once results.json is written.

  lmms-eval's own response cache (`simple_evaluate(use_cache=...)`) cannot do this: it stores
  responses only after `generate_until` returned for the whole request list (one call per task),
  so a job killed mid-task has cached nothing; its keys also include `str(model)` (an object
  address for a model instance) and it would not restore the FLOPs/token records.

Test hooks (environment, read in the job): DVLM_FAIL_AFTER_SAMPLES=N raises RuntimeError after
N freshly generated samples (0 = before the first), only in jobs whose run-dir name contains
DVLM_FAIL_ONLY when that is set; DVLM_SAMPLE_SLEEP_S=s sleeps after each generated sample of a
job's first attempt (SLURM_RESTART_COUNT unset or 0), which gives a test time to preempt it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dvlm_exp import record as rec_io

FAILED = "failed.json"
JOURNAL_DIR = "resume_cache"
# keys that do not change what a job computes
_IGNORED_KEYS = ("progress", "logger", "resume_cache")


def config_identity(cfg: DictConfig | dict) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return {k: v for k, v in c.items() if k not in _IGNORED_KEYS}


def config_hash(cfg) -> str:
    blob = json.dumps(config_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Weight files up to this size are hashed whole; larger ones by size, first and last MiB (a
# retrained or re-downloaded checkpoint differs there; an 8B model is not read for this).
_HASH_WHOLE_BYTES = 64 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_fingerprint(path) -> str | None:
    """A short identity of the checkpoint folder's config and weight files (None: no such folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    files = sorted(f for f in path.rglob("*") if f.is_file() and (f.suffix in _WEIGHT_SUFFIXES or f.name == "config.json"))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path).as_posix()}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= _HASH_WHOLE_BYTES:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def completed(run_dir: Path, cfg: DictConfig, fingerprint=None) -> dict | None:
    """The complete record in run_dir when it was made with this config (and, when both are
    known, the same weights fingerprint), else None. `fingerprint` may be a callable, called
    only when there is a matching record (it may resolve the model path: nothing is touched
    for a job that has to run anyway)."""
    if not rec_io.is_complete(run_dir):
        return None
    try:
        record = rec_io.read_results(run_dir)
    except (OSError, ValueError):
        return None
    if config_identity(record.get("config", {})) != config_identity(cfg):
        print(f"note: {run_dir} holds a complete record of another config; running this one replaces it",
              file=sys.stderr, flush=True)
        return None
    if callable(fingerprint):
        fingerprint = fingerprint()
    if fingerprint is not None and record.get("model_fingerprint") not in (None, fingerprint):
        print(f"note: {run_dir} holds a complete record made with other weights at the same model path "
              f"(fingerprint {record['model_fingerprint']} != {fingerprint}); running again", file=sys.stderr, flush=True)
        return None
    return record


def job_info() -> dict:
    env = os.environ
    info = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SUBMITIT_EXECUTOR"):
        if env.get(k):
            info[k.lower()] = env[k]
    return info


def write_failed(run_dir: Path, exc: BaseException, cfg: DictConfig | None = None) -> Path:
    rec = {
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "job": job_info(),
    }
    if cfg is not None:
        try:
            rec["config"] = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - the failure record must not fail
            rec["config"] = None
    path = Path(run_dir) / FAILED
    rec_io.write_atomic(path, json.dumps(rec, indent=2, default=str))
    return path


def exit_nonzero_at_exit(code: int = 1) -> None:
    """Make a failed submitit job's process exit non-zero, so that SLURM (sacct) says FAILED.

    Hydra catches the job's exception and submitit then pickles a normal result (the driver
    learns of the failure from it) and exits 0: SLURM would report COMPLETED. This runs after
    that pickle is written, at interpreter exit."""
    import atexit

    def _exit() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)

    atexit.register(_exit)


def clear_failed(run_dir: Path) -> None:
    try:
        (Path(run_dir) / FAILED).unlink()
    except FileNotFoundError:
        pass


class SampleJournal:
    """Wraps `generator.generate`: journal each finished sample, replay journaled ones."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool = True):
        self.root = Path(run_dir) / JOURNAL_DIR
        self.dir = self.root / config_hash(cfg)
        self.enabled = enabled
        self.replayed = 0
        self.generated = 0
        env = os.environ
        only = env.get("DVLM_FAIL_ONLY")
        fail = env.get("DVLM_FAIL_AFTER_SAMPLES")
        self.fail_after = int(fail) if fail not in (None, "") and (not only or only in Path(run_dir).name) else None
        first_attempt = env.get("SLURM_RESTART_COUNT", "0") in ("", "0")
        self.sleep_s = float(env.get("DVLM_SAMPLE_SLEEP_S") or 0) if first_attempt else 0.0

    def _key(self, question: str, until, sample_id) -> str:
        blob = json.dumps([str(sample_id), question, list(until or [])], default=str)
        return f"{sample_id}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def attach(self, generator) -> None:
        if not self.enabled and self.fail_after is None and not self.sleep_s:
            return
        original = generator.generate
        journal = self

        def generate(question, images, until=None, sample_id=0):
            key = journal._key(question, until, sample_id)
            path = journal.dir / f"{key}.pkl"
            if journal.enabled and path.is_file():
                try:
                    text, rec = pickle.loads(path.read_bytes())
                except Exception:  # noqa: BLE001 - a torn file means: generate again
                    pass
                else:
                    generator.recorder.samples.append(rec)
                    generator.recorder.current = rec
                    journal.replayed += 1
                    return text
            if journal.fail_after is not None and journal.generated >= journal.fail_after:
                raise RuntimeError(f"DVLM_FAIL_AFTER_SAMPLES={journal.fail_after}: simulated crash "
                                   f"after {journal.generated} generated samples")
            text = original(question, images, until=until, sample_id=sample_id)
            journal.generated += 1
            if journal.enabled:
                journal.dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(pickle.dumps((text, generator.recorder.current)))
                os.replace(tmp, path)
            if journal.sleep_s:
                time.sleep(journal.sleep_s)
            return text

        generator.generate = generate

    def summary(self) -> str:
        return f"resume: {self.replayed} samples from {self.dir}, {self.generated} generated"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
