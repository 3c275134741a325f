"""Job-level resume and failure records (used by dvlm_exp.run.runner).

- `completed(run_dir, cfg, fingerprint)`: the run dir already holds a complete record of this
  config AND of the same weights (`weights_fingerprint`: a retrained or replaced checkpoint at
  the same `model.path` is a different job), so a re-launched sweep (same `hydra.sweep.dir=`)
  skips the job.
- `write_failed(run_dir, exc, cfg)`: `failed.json` (status failed, error, traceback) for a job
  whose Python raised; never results.json. `clear_failed` removes a stale one after a success.
- `SampleJournal`: per-sample resume inside a job (config `resume_cache: true`). Every finished
  sample's text and `SampleRecord` are written to `<run_dir>/resume_cache/<config hash>/<key>.json`;
  a re-run of the same job in the same run dir (a requeue after SLURM preemption/timeout, an
  interrupted or resubmitted job) takes those samples from the journal instead of generating them,
  so the final record (metrics, FLOPs, tokens, predictions, per-sample latency) equals an
  uninterrupted run. The journal is removed once results.json is written. It is JSON checked
  field by field, never pickle: a run dir is data, and a planted file must not run code when the
  same command is re-run; an entry that does not parse into exactly a SampleRecord counts as torn
  (the sample is generated again).

  lmms-eval's own response cache (`simple_evaluate(use_cache=...)`) cannot do this: it stores
  responses only after `generate_until` returned for the whole request list (one call per task),
  so a job killed mid-task has cached nothing; its keys also include `str(model)` (an object
  address for a model instance) and it would not restore the FLOPs/token records.
- `RunDirLock`: one run per run dir (an exclusive flock on `<run_dir>/.dvlm_lock`, released by the
  kernel when the process ends, even on kill -9); `LockRunDir` takes it in a single run before
  Hydra writes `.hydra/` (a Hydra callback, conf/config.yaml).
- `interrupts_raise`: SIGTERM/SIGINT become `Interrupted`, reported by the job in one line.

Test hooks (environment, read in the job): DVLM_FAIL_AFTER_SAMPLES=N raises RuntimeError after
N freshly generated samples (0 = before the first), only in jobs whose run-dir name contains
DVLM_FAIL_ONLY when that is set (and, with DVLM_FAIL_RANK=r, only on rank r of a multi-process
job); DVLM_SAMPLE_SLEEP_S=s sleeps after each generated sample of a
job's first attempt (SLURM_RESTART_COUNT unset or 0), which gives a test time to preempt it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dvlm_exp.run import distributed
from dvlm_exp.run import record as rec_io

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
    info = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **distributed.info()}
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
    path = Path(run_dir) / distributed.rank_file(FAILED)  # failed.rank<r>.json on rank r > 0
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


_HYDRA_ONLY = {".hydra", ".dvlm_lock", JOURNAL_DIR}


def discard_new_run_dir(run_dir: Path) -> bool:
    """Remove a run dir that this process created (a default `${dvlm_new_dir:...}` one) and that holds
    only Hydra's files, the lock and the job's log: a run refused for bad input leaves no run dir that
    looks like a run. A dir given with hydra.run.dir, or holding anything else, stays."""
    from dvlm_exp.run.paths import CREATED

    real = os.path.realpath(run_dir)
    if real not in CREATED:
        return False
    try:
        names = {p.name for p in Path(real).iterdir()}
    except OSError:
        return False
    if any(n not in _HYDRA_ONLY and not n.endswith(".log") for n in names):
        return False
    shutil.rmtree(real, ignore_errors=True)
    CREATED.discard(real)
    return True


def clear_failed(run_dir: Path) -> None:
    for path in [Path(run_dir) / FAILED, *Path(run_dir).glob("failed.rank*.json")]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# ---- the per-sample journal ------------------------------------------------------------------

JOURNAL_FORMAT = 1
_MAX_ENTRY_BYTES = 16 << 20  # one sample's record is a few kB; anything far larger is not ours


def record_to_json(rec) -> dict:
    """A SampleRecord as JSON values; dict fields (Counter keys are ints or (n_query, n_key)
    tuples, which JSON keys cannot be) become [key, value] pairs in insertion order."""
    out = {}
    for f in dataclasses.fields(rec):
        v = getattr(rec, f.name)
        if isinstance(v, dict):
            v = [[list(k) if isinstance(k, tuple) else k, n] for k, n in v.items()]
        out[f.name] = v
    return out


def _int(x) -> int:
    if type(x) is not int:  # bool is an int subclass, and a float count would not be ours
        raise ValueError(f"not an int: {x!r}")
    return x


def _dict_key(k):
    return tuple(_int(i) for i in k) if isinstance(k, list) else _int(k)


def record_from_json(d):
    """The exact SampleRecord `record_to_json` wrote; ValueError/TypeError on any other shape."""
    from dvlm_exp.engine.recorder import SampleRecord

    proto = SampleRecord()
    names = [f.name for f in dataclasses.fields(proto)]
    if not isinstance(d, dict) or sorted(d) != sorted(names):
        raise ValueError("not a SampleRecord")
    kw = {}
    for name in names:
        v, default = d[name], getattr(proto, name)
        if isinstance(default, dict):  # Counter or dict: [[key, count], ...]
            kw[name] = type(default)({_dict_key(k): _int(n) for k, n in v})
        elif isinstance(default, list):
            if not isinstance(v, list):
                raise ValueError(f"{name}: not a list")
            kw[name] = [_int(x) for x in v]
        elif isinstance(default, float):
            if type(v) not in (int, float) or not math.isfinite(v):
                raise ValueError(f"{name}: not a finite number")
            kw[name] = float(v)
        else:
            kw[name] = _int(v)
    return SampleRecord(**kw)


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
        if env.get("DVLM_FAIL_RANK") not in (None, "", env.get("RANK", "0")):  # test hook: one rank dies
            self.fail_after = None
        first_attempt = env.get("SLURM_RESTART_COUNT", "0") in ("", "0")
        self.sleep_s = float(env.get("DVLM_SAMPLE_SLEEP_S") or 0) if first_attempt else 0.0

    def _key(self, question: str, until, sample_id) -> str:
        blob = json.dumps([str(sample_id), question, list(until or [])], default=str)
        return f"{sample_id}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def load(self, key: str):
        """(text, SampleRecord) journaled under key, or None when absent, unreadable or malformed."""
        path = self.dir / f"{key}.json"
        try:
            with open(path, "rb") as f:
                blob = f.read(_MAX_ENTRY_BYTES + 1)
            entry = json.loads(blob)
            if (len(blob) > _MAX_ENTRY_BYTES or not isinstance(entry, dict) or entry.get("format") != JOURNAL_FORMAT
                    or entry.get("key") != key or not isinstance(entry.get("text"), str)):
                return None
            return entry["text"], record_from_json(entry.get("record"))
        except (OSError, ValueError, TypeError, RecursionError):  # torn, foreign or hostile: generate again
            return None

    def save(self, key: str, text: str, rec) -> None:
        entry = {"format": JOURNAL_FORMAT, "key": key, "text": text, "record": record_to_json(rec)}
        rec_io.write_atomic(self.dir / f"{key}.json", json.dumps(entry))

    def count(self) -> int:
        """Samples journaled for this config (the interruption message tells the user)."""
        return len(list(self.dir.glob("*.json"))) if self.dir.is_dir() else 0

    def attach(self, generator) -> None:
        if not self.enabled and self.fail_after is None and not self.sleep_s:
            return
        original = generator.generate
        journal = self

        def generate(question, images, until=None, sample_id=0):
            key = journal._key(question, until, sample_id)
            hit = journal.load(key) if journal.enabled else None
            if hit is not None:
                text, rec = hit
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
                journal.save(key, text, generator.recorder.current)
            if journal.sleep_s:
                time.sleep(journal.sleep_s)
            return text

        generator.generate = generate

    def summary(self) -> str:
        return f"resume: {self.replayed} samples from {self.dir}, {self.generated} generated"

    def interrupted_message(self, exc: BaseException) -> str:
        name = exc.name if isinstance(exc, Interrupted) else "SIGINT"  # KeyboardInterrupt: Python's own SIGINT
        done = f"interrupted by {name} after {self.replayed + self.generated} samples"
        if not self.enabled:
            return f"{done}; nothing journaled (resume_cache=false): re-running the same command starts over"
        return f"{done}; {self.count()} journaled in {self.dir}; re-run the same command to resume"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ---- interruptions ------------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGTERM/SIGINT in a job. A BaseException, so that no `except Exception` on the way (lmms-eval,
    the job's own failure handling) turns it into a failed.json or swallows it."""

    def __init__(self, signum: int):
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # what a shell reports for a process killed by the signal
        super().__init__(self.name)


@contextlib.contextmanager
def interrupts_raise(term: bool = True):
    """SIGINT (and SIGTERM when `term`) raise Interrupted in the main thread for the duration.
    Under submitit leave SIGTERM alone: submitit installs its own handlers (USR2 = requeue). A
    signal the parent set to be ignored (`cmd &` in a script ignores SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    sigs = [s for s in [signal.SIGINT] + ([signal.SIGTERM] if term else []) if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, raise_interrupted) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- one run per run dir ------------------------------------------------------------------------

LOCK = ".dvlm_lock"


class RunDirBusy(Exception):
    pass


class RunDirLock:
    """Exclusive flock on `<run_dir>/.dvlm_lock`, whose content names the holder. A lock held by
    this process already (the single-run callback took it before the job) is reused, not retaken:
    flock locks of two descriptors of one file conflict even in one process."""

    _held: dict[str, int] = {}  # real run dir -> descriptor holding its lock

    def __init__(self, run_dir, overrides=(), wait_s: float = 0.0):
        self.run_dir = Path(os.path.realpath(run_dir))
        self.overrides = list(overrides)
        self.wait_s = wait_s
        self.owner = False

    def acquire(self) -> RunDirLock:
        key = str(self.run_dir)
        if key in self._held:
            return self
        path = self.run_dir / distributed.rank_file(LOCK)  # each rank of a multi-process job its own
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise rec_io.WriteError(path, e) from None
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunDirBusy(f"{self.run_dir} is in use by another run ({holder}); wait for it to end "
                                     f"or give this one another hydra.run.dir / hydra.sweep.dir") from None
                time.sleep(1)  # a requeued SLURM job whose previous attempt is still exiting
            except OSError as e:  # a file system without flock (some Lustre mounts): run, unguarded
                os.close(fd)
                print(f"note: cannot lock {path} ({e.strerror}); nothing stops a second run into {self.run_dir}",
                      file=sys.stderr, flush=True)
                return self
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": shlex.join(sys.argv), "overrides": self.overrides}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, a refused run just cannot name us
        self._held[key] = fd
        self.owner = True
        return self

    def release(self) -> None:
        if self.owner:
            os.close(self._held.pop(str(self.run_dir)))  # closing the descriptor drops the flock
            self.owner = False

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its details right after locking: give it a moment
        try:
            info = json.loads(os.pread(fd, 1 << 16, 0))
            return (f"pid {info['pid']} on {info['host']}, started {info['started']}, "
                    f"command: {info['command']}, overrides: {' '.join(info['overrides']) or '(none)'}")
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "holder unknown"


class LockRunDir(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): a single run locks its run dir before
    Hydra writes `.hydra/` and the log there, so a second run into a busy dir changes none of its
    files. A multirun job locks its own dir when it starts (dvlm_exp.run.runner.main), after Hydra
    saved that job's `.hydra/` (Hydra has no public hook before that)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            run_dir = os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir")))
            overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        except Exception:  # noqa: BLE001 - a dir Hydra cannot resolve here: the job locks it itself
            return
        problem = distributed.check_run_dir(OmegaConf.select(config, "hydra.overrides.hydra"))
        if problem:  # torchrun/accelerate: each rank would resolve ${now:...} by itself
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)
        try:
            RunDirLock(run_dir, overrides).acquire()  # held until this process exits
        except (RunDirBusy, rec_io.WriteError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2 if isinstance(e, RunDirBusy) else 1)
