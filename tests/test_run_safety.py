"""A run dir is data, and one run owns it: the resume journal never runs code from it, a second run
into a busy run dir is refused, interruptions and unwritable files end with one `error:` line,
and an interrupted run resumes to the record of an uninterrupted one (dvlm_exp/run/resume.py,
dvlm_exp/run/record.py, dvlm_exp/runner.main)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO

# the sandbox with pruning: the journaled records hold pruned counts, not only defaults
ARGS = ("limit=3", "progress=false", "prune=fastv", "prune.layer=2", "ratio=0.25")
HOOKS = ("DVLM_FAIL_AFTER_SAMPLES", "DVLM_FAIL_ONLY", "DVLM_SAMPLE_SLEEP_S")


def _env(env_extra=None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in HOOKS:
        env.pop(k, None)
    env.update(env_extra or {})
    return env


def _default_signals():  # a background pytest may hand SIG_IGN for SIGINT down to its children
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, env_extra=None, script="run.py") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=_env(env_extra), text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_signals)


def run_cli(*args, env_extra=None, script="run.py", timeout=600) -> subprocess.CompletedProcess:
    p = start(*args, env_extra=env_extra, script=script)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def stable(run_dir: Path) -> tuple[dict, list]:
    """Record and predictions without what legitimately differs between two runs of one config."""
    rec = json.loads((run_dir / "results.json").read_text())
    for k in ("timing", "memory", "wandb"):
        rec.pop(k, None)
    preds = [json.loads(ln) for ln in (run_dir / "predictions.jsonl").read_text().splitlines()]
    for p in preds:
        p.pop("latency_s", None)
    return rec, preds


def wait_for_journal(run_dir: Path, proc: subprocess.Popen, n: int = 1, timeout: float = 240) -> None:
    """Until n samples are journaled (in whatever format the journal uses)."""
    deadline = time.time() + timeout
    while len([p for p in run_dir.glob("resume_cache/*/*") if not p.name.endswith(".tmp")]) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no sample journaled in time"
        time.sleep(0.2)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def assert_no_record(run_dir: Path) -> None:
    from dvlm_exp.run.record import is_complete

    assert not (run_dir / "results.json").exists() and not (run_dir / ".dvlm_complete").exists()
    assert not is_complete(run_dir)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The uninterrupted run every resumed run must equal."""
    d = tmp_path_factory.mktemp("clean")
    p = run_cli(*ARGS, f"hydra.run.dir={d}")
    assert p.returncode == 0, p.stderr[-3000:]
    return stable(d)


# ---- 1. no code from data -----------------------------------------------------------------------

class _Generator:
    """generate() fills every SampleRecord field with values of its real types."""

    def __init__(self):
        from dvlm_exp.engine.recorder import Recorder

        self.recorder = Recorder()
        self.calls = 0

    def generate(self, question, images, until=None, sample_id=0):
        self.calls += 1
        i = int(sample_id)
        rec = self.recorder.start_sample()
        rec.n_visual, rec.vision_views, rec.vision_patches, rec.n_forwards = 100 + i, 2, 729, 4
        rec.layer_calls = Counter({(300 + i, 300 + i): 8, (120, 120): 24})
        rec.baseline_forwards = Counter({300 + i: 4})
        rec.baseline_layer_calls = Counter({(1, 301 + i): 32})
        rec.lm_head_rows, rec.baseline_lm_head_rows, rec.scoring_flops = 16, 32, 123_456_789_012
        rec.visual_kept = [100 + i, 25, 25, 0]
        rec.kept_by_step_layer = {(0, 0): 100 + i, (0, 2): 25, (3, 1): 0}
        rec.generated_tokens, rec.latency_s, rec.scoring_s = 3, 0.1 + i / 3, 1e-7
        rec.output_ids = [5, 126081, i]
        return f"answer {i}"


class _Payload:
    """Unpickling this runs code: it writes `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('payload ran')",))


def _entry(key: str, text: str, rec) -> dict:
    """A journal entry as the journal writes it: JSON, dict fields as [key, value] pairs."""
    r = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
    for name, v in r.items():
        if isinstance(v, dict):
            r[name] = [[list(k) if isinstance(k, tuple) else k, n] for k, n in v.items()]
    return {"format": 1, "key": key, "text": text, "record": r}


def _journal(run_dir, cfg):
    from dvlm_exp.run.resume import SampleJournal

    return SampleJournal(run_dir, cfg)


def test_journal_is_json_and_replays_the_exact_record(tmp_path, tiny_cfg, monkeypatch):
    """Entries are JSON (no pickle) and come back as an equal SampleRecord: the Counters with
    tuple keys, the (step, layer) dict and the floats included."""
    for k in HOOKS:
        monkeypatch.delenv(k, raising=False)
    g1 = _Generator()
    j1 = _journal(tmp_path, tiny_cfg)
    j1.attach(g1)
    texts = [g1.generate("q", [], until=["x"], sample_id=i) for i in range(2)]
    files = sorted(j1.dir.iterdir())
    assert [f.suffix for f in files] == [".json", ".json"], files
    for i, f in enumerate(files):  # plain JSON, in the shape the hostile variants below start from
        assert json.loads(f.read_text()) == _entry(f.stem, texts[i], g1.recorder.samples[i])
    g2 = _Generator()
    j2 = _journal(tmp_path, tiny_cfg)
    j2.attach(g2)
    assert [g2.generate("q", [], until=["x"], sample_id=i) for i in range(2)] == texts
    assert g2.calls == 0 and j2.replayed == 2
    assert g2.recorder.samples == g1.recorder.samples
    for a, b in zip(g2.recorder.samples, g1.recorder.samples):
        assert type(a.layer_calls) is Counter and list(a.layer_calls) == list(b.layer_calls)
        assert list(a.kept_by_step_layer) == [(0, 0), (0, 2), (3, 1)]


HOSTILE = [
    b"[" * 200_000,                                   # nesting deeper than the parser's recursion
    b"\xff\xfe\x00not utf-8",
    b"null",
    b'{"format": 1, "key": "KEY", "text": 5, "record": {}}',
    b'{"format": 1, "key": "KEY", "text": "x", "record": {"__class__": "os.system"}}',
    b"RECORD:n_visual=\"136\"",
    b"RECORD:visual_kept=[true, false]",
    b"RECORD:layer_calls={\"1\": 2}",
    b"RECORD:layer_calls=[[[1, [2]], 3]]",
    b"RECORD:latency_s=1e400",
    b"RECORD:extra=1",
    b"OTHER_KEY",                                      # a well-formed entry of another sample
]


def test_planted_pickle_and_hostile_json_never_run_and_are_regenerated(tmp_path, tiny_cfg, monkeypatch):
    """At each journal key: a pickle whose payload writes a file, and a JSON file of a hostile
    shape. Re-run: no payload runs, every sample is generated again, records equal fresh ones."""
    for k in HOOKS:
        monkeypatch.delenv(k, raising=False)
    n = len(HOSTILE)
    g1 = _Generator()
    j1 = _journal(tmp_path, tiny_cfg)
    j1.attach(g1)
    fresh = [g1.generate("q", [], sample_id=i) for i in range(n)]
    pwned = tmp_path / "pwned"
    for i, shape in enumerate(HOSTILE):
        key = j1._key("q", None, i)
        (j1.dir / f"{key}.pkl").write_bytes(pickle.dumps(_Payload(pwned)))
        if shape == b"OTHER_KEY":
            other = (i + 1) % n
            blob = json.dumps(_entry(j1._key("q", None, other), fresh[other], g1.recorder.samples[other])).encode()
        elif shape.startswith(b"RECORD:"):  # a well-formed entry with one field made hostile
            entry = _entry(key, fresh[i], g1.recorder.samples[i])
            name, value = shape[len(b"RECORD:"):].decode().split("=", 1)
            entry["record"][name] = json.loads(value)
            blob = json.dumps(entry).encode()
        else:
            blob = shape.replace(b"KEY", key.encode())
        (j1.dir / f"{key}.json").write_bytes(blob)
    g2 = _Generator()
    j2 = _journal(tmp_path, tiny_cfg)
    j2.attach(g2)
    assert [g2.generate("q", [], sample_id=i) for i in range(n)] == fresh
    assert not pwned.exists(), "a planted pickle ran its payload"
    assert g2.calls == n and j2.replayed == 0
    assert g2.recorder.samples == g1.recorder.samples


def test_planted_files_in_a_cli_run_dir(tmp_path, clean):
    """End to end: a job crashed after 2 samples; a pickle payload and a hostile JSON are planted
    at the first sample's journal key. The same command again: the payload never runs, the job
    completes, the intact entry is replayed, and the record equals a clean run's."""
    run = tmp_path / "run"
    p = run_cli(*ARGS, f"hydra.run.dir={run}", env_extra={"DVLM_FAIL_AFTER_SAMPLES": "2"})
    assert p.returncode != 0 and "simulated crash" in p.stderr, p.stderr[-3000:]
    entries = sorted(run.glob("resume_cache/*/*"))
    assert len(entries) == 2, entries
    first = next(e for e in entries if e.name.startswith("0-"))
    stem = first.name.split(".")[0]
    pwned = tmp_path / "pwned"
    (first.parent / f"{stem}.pkl").write_bytes(pickle.dumps(_Payload(pwned)))
    (first.parent / f"{stem}.json").write_text(json.dumps({"format": 1, "key": stem, "text": "forged",
                                                           "record": {"n_visual": [["__import__"]]}}))
    p = run_cli(*ARGS, f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert not pwned.exists(), "a planted pickle ran its payload"
    assert "resume: 1 samples from" in p.stdout and ", 2 generated" in p.stdout, p.stdout[-2000:]
    assert stable(run) == clean
    assert not (run / "resume_cache").exists()


# ---- 2. one run per run dir ---------------------------------------------------------------------

def test_second_run_into_a_busy_run_dir_is_refused(tmp_path):
    """A slow run holds X (and another one P/s0). A second run into X with another config exits 2
    with one `error:` line naming the first's pid and changes none of X's files; a multirun whose
    job seed=0 lands in P/s0 fails that job only. Both slow runs finish with their own config."""
    x, sweep = tmp_path / "x", tmp_path / "sweep"
    slow = {"DVLM_SAMPLE_SLEEP_S": "40"}
    a = start("limit=1", "progress=false", f"hydra.run.dir={x}", env_extra=slow)
    a2 = start("limit=1", "progress=false", "seed=5", f"hydra.run.dir={sweep / 's0'}", env_extra=slow)
    try:
        wait_for_journal(x, a)
        wait_for_journal(sweep / "s0", a2)
        hydra_files = {f.name: f.read_bytes() for f in (x / ".hydra").iterdir()}
        b = run_cli("limit=1", "progress=false", "seed=1", "prune=random", f"hydra.run.dir={x}", timeout=300)
        assert b.returncode == 2, (b.returncode, b.stderr[-3000:])
        errs = error_lines(b.stderr)
        assert len(errs) == 1 and "in use by another run" in errs[0] and f"pid {a.pid} " in errs[0], b.stderr[-3000:]
        assert "limit=1 progress=false" in errs[0] and "Traceback" not in b.stderr
        assert {f.name: f.read_bytes() for f in (x / ".hydra").iterdir()} == hydra_files
        assert not (x / "failed.json").exists() and not (x / "results.json").exists()

        m = run_cli("-m", "limit=1", "progress=false", "seed=0,1", f"hydra.sweep.dir={sweep}",
                    "hydra.sweep.subdir=s${seed}", timeout=600)
        assert m.returncode != 0, m.stderr[-3000:]
        assert any("in use by another run" in e and f"pid {a2.pid} " in e for e in error_lines(m.stderr)), m.stderr[-3000:]
        assert (sweep / "s1" / ".dvlm_complete").exists()
        assert not (sweep / "s0" / "failed.json").exists() and not (sweep / "s0" / "results.json").exists()
        out, err = a.communicate(timeout=300)
        assert a.returncode == 0, err[-3000:]
        out2, err2 = a2.communicate(timeout=300)
        assert a2.returncode == 0, err2[-3000:]
    finally:
        for proc in (a, a2):
            if proc.poll() is None:
                proc.kill()
    rec = json.loads((x / "results.json").read_text())
    assert rec["config"]["seed"] == 0 and rec["config"]["prune"]["name"] == "none"
    assert "seed: 0" in (x / ".hydra" / "config.yaml").read_text()
    assert {f.name: f.read_bytes() for f in (x / ".hydra").iterdir()} == hydra_files
    assert json.loads((sweep / "s0" / "results.json").read_text())["config"]["seed"] == 5
    assert json.loads((sweep / "s1" / "results.json").read_text())["config"]["seed"] == 1


# ---- 3 + 4. interruptions -----------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_run_says_so_and_resumes_to_the_same_record(tmp_path, clean, sig):
    """TERM / INT mid-run: one `error:` line (samples done, journaled, how to resume), exit 143 /
    130, no traceback, no record. kill -9: no record either. The same command then resumes and its
    record equals the uninterrupted run's (identical seeds, identical records)."""
    run = tmp_path / "run"
    proc = start(*ARGS, f"hydra.run.dir={run}", env_extra={"DVLM_SAMPLE_SLEEP_S": "120"})
    try:
        wait_for_journal(run, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_no_record(run)
    assert not (run / "failed.json").exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
        errs = error_lines(err)
        assert len(errs) == 1, err[-3000:]
        assert re.fullmatch(rf"error: interrupted by {sig.name} after 1 samples; 1 journaled in "
                            rf"{re.escape(str(run))}/resume_cache/\w+; re-run the same command to resume", errs[0]), errs
    p = run_cli(*ARGS, f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resume: 1 samples from" in p.stdout, p.stdout[-2000:]
    assert stable(run) == clean


# ---- 3. unwritable run dirs ---------------------------------------------------------------------

FAULTY_RUN = r'''
"""run.py with the file system under FAULT_DIR failing: FAULT_MODE=readonly refuses to open
anything there for writing (a read-only mount), FAULT_MODE=full lets files be created but every
write fails (a full disk; Hydra's .hydra/ and run.log, written before the job, still fit)."""
import builtins, errno, io, os, runpy, sys

DIR = os.path.realpath(os.environ["FAULT_DIR"])
MODE = os.environ["FAULT_MODE"]
ERR = errno.EROFS if MODE == "readonly" else errno.ENOSPC
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def hit(path) -> bool:
    p = os.path.realpath(os.fspath(path))
    if not p.startswith(DIR + os.sep):
        return False
    return MODE == "readonly" or os.path.relpath(p, DIR).split(os.sep)[0] not in (".hydra", "run.log")


def fail(path):
    raise OSError(ERR, os.strerror(ERR), os.fspath(path))


class Full:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(ERR, os.strerror(ERR))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


real_os_open, real_open, real_fdopen, real_mkdir = os.open, io.open, os.fdopen, os.mkdir


def os_open(path, flags, *a, **k):
    if MODE == "readonly" and flags & WRITE and hit(path):
        fail(path)
    return real_os_open(path, flags, *a, **k)


def open_(file, mode="r", *a, **k):
    writing = not isinstance(file, int) and any(c in mode for c in "wax+") and hit(file)
    if writing and MODE == "readonly":
        fail(file)
    f = real_open(file, mode, *a, **k)
    return Full(f) if writing else f


def fdopen(fd, mode="r", *a, **k):
    f = real_fdopen(fd, mode, *a, **k)
    return Full(f) if any(c in mode for c in "wax+") and hit(os.readlink(f"/proc/self/fd/{fd}")) else f


def mkdir(path, *a, **k):
    if MODE == "readonly" and hit(path):
        fail(path)
    return real_mkdir(path, *a, **k)


os.open, os.fdopen, os.mkdir = os_open, fdopen, mkdir
builtins.open = io.open = open_
run_py = os.path.join(os.getcwd(), "run.py")
sys.argv = [run_py, *sys.argv[1:]]
runpy.run_path(run_py, run_name="__main__")
'''


def _faulty(tmp_path: Path) -> Path:
    script = tmp_path / "faulty_run.py"
    script.write_text(FAULTY_RUN)
    return script


def _leftovers(run_dir: Path) -> list[str]:
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("journal", ["true", "false"])
def test_full_disk_ends_with_one_line_and_no_temp_files(tmp_path, journal):
    """The disk fills up during the run (every write in the run dir fails with ENOSPC, also
    failed.json's): one `error: cannot write <path>: ... (free space: X MB)` line, exit 1, no
    traceback, no record, no temp file. With the journal on, its first entry is what fails; off,
    predictions.jsonl at the end."""
    run = tmp_path / "run"
    p = run_cli(*ARGS, f"resume_cache={journal}", f"hydra.run.dir={run}", script=_faulty(tmp_path),
                env_extra={"FAULT_DIR": str(run), "FAULT_MODE": "full"})
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errs = error_lines(p.stderr)
    target = r"resume_cache/\w+/0-\w+\.json" if journal == "true" else r"predictions\.jsonl"
    assert len(errs) == 1 and re.fullmatch(rf"error: cannot write {re.escape(str(run))}/{target}: "
                                           r"No space left on device \(free space: \d+ MB\)", errs[0]), errs
    assert_no_record(run)
    assert _leftovers(run) == [] and not (run / "failed.json").exists()


def test_read_only_run_dir_ends_with_one_line(tmp_path):
    """A run dir on a read-only file system (chmod does not stop root, so the file system is
    faked): one `error: cannot write` line before Hydra writes anything there, no traceback."""
    run = tmp_path / "run"
    run.mkdir()
    p = run_cli(*ARGS, f"hydra.run.dir={run}", script=_faulty(tmp_path),
                env_extra={"FAULT_DIR": str(run), "FAULT_MODE": "readonly"}, timeout=300)
    assert p.returncode not in (0, None), p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errs = error_lines(p.stderr)
    assert len(errs) == 1 and re.fullmatch(rf"error: cannot write {re.escape(str(run))}/\S+: Read-only file system "
                                           r"\(free space: \d+ MB\)", errs[0]), p.stderr[-3000:]
    assert list(run.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 dir; the faked file system above covers it")
def test_chmod_read_only_run_dir_ends_with_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        p = run_cli(*ARGS, f"hydra.run.dir={run}", timeout=300)
    finally:
        run.chmod(0o755)
    assert p.returncode not in (0, None) and "Traceback" not in p.stderr, p.stderr[-3000:]
    errs = error_lines(p.stderr)
    assert len(errs) == 1 and errs[0].startswith(f"error: cannot write {run}/") and "Permission denied" in errs[0], errs
    assert list(run.iterdir()) == []


def test_write_atomic_full_disk_names_path_and_leaves_nothing(tmp_path, monkeypatch):
    from dvlm_exp.run import record as rec_io

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, os.strerror(28))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError) as e:
        rec_io.write_atomic(tmp_path / "results.json", "{}")
    monkeypatch.undo()
    assert re.fullmatch(rf"cannot write {re.escape(str(tmp_path))}/results\.json: No space left on device "
                        r"\(free space: \d+ MB\)", str(e.value)), str(e.value)
    assert list(tmp_path.iterdir()) == []
