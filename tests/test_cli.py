"""run.py end to end in subprocesses: default run, FastV, a multirun, W&B offline, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCHEMA = {
    "config": dict, "metrics": dict, "flops": dict, "tokens": dict, "timing": dict, "memory": dict, "versions": dict,
}


def run_cli(*args, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def check_record(run_dir: Path, prune: str, metric: str = "anls,none") -> dict:
    from dvlm_exp.run.record import is_complete

    assert is_complete(run_dir)
    rec = json.loads((run_dir / "results.json").read_text())
    for key, typ in SCHEMA.items():
        assert isinstance(rec[key], typ), key
    assert rec["status"] == "complete"
    assert rec["config"]["prune"]["name"] == prune
    assert metric in rec["metrics"]
    f = rec["flops"]
    assert {"total", "baseline_total", "reduction", "convention"} <= set(f)
    assert set(rec["tokens"]) >= {"visual_per_sample", "visual_kept_avg"}
    assert set(rec["timing"]) >= {"latency_s_per_sample", "tokens_per_s", "nfe"}
    assert rec["memory"]["peak_bytes"] > 0
    assert rec["versions"]["torch"] and rec["versions"]["lmms_eval"]
    assert len(rec["tokens"]["visual_per_sample"]) == rec["n_samples"] == rec["config"]["limit"]
    preds = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == rec["n_samples"]
    return rec


def test_default_run(tmp_path):
    """No arguments but the sample count: the trained sandbox on its held-out shapes task."""
    p = run_cli("limit=2", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    rec = check_record(tmp_path, "none", metric="exact_match,none")
    assert rec["config"]["model"]["name"] == "sandbox" and rec["task"] == "synth_shapes"
    assert rec["flops"]["reduction"] == 0.0
    assert rec["tokens"]["visual_kept_avg"] == sum(rec["tokens"]["visual_per_sample"]) / 2
    assert "reduction" in p.stdout and "results.json" in p.stdout and "exact_match=" in p.stdout


def test_fastv_run_with_wandb_offline(tmp_path):
    """No W&B credentials at all (no WANDB_API_KEY, no netrc entry): offline files under the run dir."""
    p = run_cli("model=tiny", "task=synth_docvqa", "prune=fastv", "prune.layer=2", "ratio=0.35", "limit=2", "logger=wandb",
                f"hydra.run.dir={tmp_path}", env_extra={"NETRC": str(tmp_path / "no-netrc")})
    assert p.returncode == 0, p.stderr[-3000:]
    rec = check_record(tmp_path, "fastv")
    vis, kept = rec["tokens"]["visual_per_sample"], rec["tokens"]["visual_kept_per_sample"]
    assert kept == [round(v * 0.35) for v in vis]
    assert 0.4 < rec["flops"]["reduction"] < 0.8
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert rec["wandb"]["mode"] == "offline"


def test_multirun_one_record_per_job(tmp_path):
    p = run_cli("-m", "prune=none,fastv", "ratio=0.5", "limit=1", f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in tmp_path.iterdir() if d.is_dir() and (d / "results.json").exists())
    assert len(jobs) == 2
    prunes = sorted(json.loads((d / "results.json").read_text())["config"]["prune"]["name"] for d in jobs)
    assert prunes == ["fastv", "none"]
    for d in jobs:
        check_record(d, json.loads((d / "results.json").read_text())["config"]["prune"]["name"], "exact_match,none")


@pytest.mark.parametrize("args,needle", [
    (["ratio=0"], "ratio=0 is outside (0, 1]"),
    (["ratio=1.2"], "ratio=1.2 is outside (0, 1]"),
    (["prune=fastv", "prune.layer=4"], "prune.layer=4 is outside [1, 3]"),
    (["prune=fastv", "prune.layer=0"], "prune.layer=0 is outside [1, 3]"),
    (["prune=fastv", "schedule=at_step", "schedule.step=16"], "schedule.step=16 is outside [0, 15]"),
    (["prune=fastv", "schedule=at_step"], "schedule=at_step needs schedule.step"),
    (["task.gen.gen_length=30"], "gen_length=30 must be divisible by task.gen.block_length=32"),
    (["task.gen.block_length=8", "task.gen.steps=6"], "steps=6 must be divisible by the number of blocks"),
    (["prune=fastv", "prune.query_set=everything"], "prune.query_set=everything must be one of"),
    (["model=llada_v"], "model.path"),
    (["model=llada_v", "model.path=/nonexistent/LLaDA-V"], "/nonexistent/LLaDA-V is not a directory"),
])
def test_bad_input_fails_before_loading(tmp_path, args, needle):
    p = run_cli("task=synth_docvqa", *args, f"hydra.run.dir={tmp_path}", timeout=120)  # the DocVQA preset 32/32/16
    assert p.returncode != 0
    assert needle in p.stderr, p.stderr[-2000:]
    assert len([ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("group,name", [("prune", "fastvv"), ("model", "llada"), ("task", "docvqa_x"), ("schedule", "late")])
def test_unknown_names_list_choices(tmp_path, group, name):
    p = run_cli(f"{group}={name}", f"hydra.run.dir={tmp_path}", timeout=120)
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{group}={name}: no config '{name}' in group '{group}'" in errors[0], p.stderr[-2000:]
    assert "use one of: " in errors[0] and f"conf/{group}/" in errors[0]


def test_hydra_flags_and_override_prefixes_still_work():
    """run.py checks the command line before Hydra runs (dvlm_exp.run.validate.check_overrides); Hydra's
    own flags and the +key / ++key / ~key / hydra.* overrides still mean what they mean to Hydra."""
    p = run_cli("--cfg", "job", "prune=fastv", "+extra.note=hi", "++ratio=0.2", "~loyalty", "hydra.job.chdir=false",
                timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "note: hi" in p.stdout and "ratio: 0.2" in p.stdout and "loyalty:" not in p.stdout
    assert "name: fastv" in p.stdout
    p = run_cli("--info", "defaults", timeout=60)
    assert p.returncode == 0 and "model/sandbox" in p.stdout, p.stderr[-2000:]


def test_interrupted_run_leaves_no_results(tmp_path, monkeypatch, tiny_cfg):
    """A run that dies during evaluation writes neither results.json nor the completion marker."""
    from dvlm_exp.run import runner

    def boom(cfg, generator):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "evaluate", boom)
    with pytest.raises(KeyboardInterrupt):
        runner.run(tiny_cfg, tmp_path)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / ".dvlm_complete").exists()


def test_help_is_fast_and_lists_groups():
    p = subprocess.run([sys.executable, "run.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for g in ("model", "prune", "schedule", "task", "logger"):
        assert f"{g}:" in p.stdout


def test_rerun_skips_only_with_the_same_weights(tmp_path):
    """A re-launched job whose run dir is complete is skipped, unless the checkpoint at the same
    model.path changed since (a retrained sandbox): then it runs again and records the new weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(REPO / "dvlm_exp" / "assets" / "sandbox", ckpt)
    args = ("model=sandbox", f"model.path={ckpt}", "limit=1", f"hydra.run.dir={tmp_path / 'run'}")
    p1 = run_cli(*args)
    assert p1.returncode == 0, p1.stderr[-3000:]
    fp1 = json.loads((tmp_path / "run" / "results.json").read_text())["model_fingerprint"]
    p2 = run_cli(*args)
    assert p2.returncode == 0 and f"skip: {tmp_path / 'run'} already complete" in p2.stdout, p2.stdout[-2000:]
    # "retrain": one tensor in the middle of the file changes
    (f,) = ckpt.glob("*.safetensors")
    t = load_file(f)
    name = sorted(t)[len(t) // 2]
    t[name] = t[name] + 1e-3
    save_file(t, f, metadata={"format": "pt"})
    p3 = run_cli(*args)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "skip:" not in p3.stdout and "made with other weights" in p3.stderr
    fp3 = json.loads((tmp_path / "run" / "results.json").read_text())["model_fingerprint"]
    assert fp1 and fp3 and fp3 != fp1


def test_rerun_with_another_method_or_ratio_is_not_skipped(tmp_path):
    """A run dir holding a complete record of prune=none must not count as done for prune=fastv
    (nor fastv ratio=0.5 for ratio=0.25): the resume check must compare the whole config, not
    only some keys. Catches resume.config_identity/completed ignoring `prune` or `ratio`."""
    run = tmp_path / "run"
    small = ("model=tiny", "task=synth_docvqa", "limit=1", "progress=false", "task.gen.gen_length=8",
             "task.gen.block_length=8", "task.gen.steps=4", f"hydra.run.dir={run}")
    p1 = run_cli(*small, "prune=none")
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["config"]["prune"]["name"] == "none"
    for ratio in (0.5, 0.25):
        p = run_cli(*small, "prune=fastv", "prune.layer=2", f"ratio={ratio}")
        assert p.returncode == 0, p.stderr[-3000:]
        assert "skip:" not in p.stdout, f"ratio={ratio}: {p.stdout[-2000:]}"
        assert "holds a complete record of another config" in p.stderr, p.stderr[-2000:]
        rec = check_record(run, "fastv")
        assert rec["config"]["ratio"] == ratio
        vis, kept = rec["tokens"]["visual_per_sample"], rec["tokens"]["visual_kept_per_sample"]
        assert kept == [round(v * ratio) for v in vis]  # really pruned at the new ratio
    # the same config again is skipped (so the checks above are not vacuous)
    p = run_cli(*small, "prune=fastv", "prune.layer=2", "ratio=0.25")
    assert p.returncode == 0 and f"skip: {run} already complete" in p.stdout, p.stdout[-2000:]


class _TornWrite:
    """A text file whose first write() puts half of the data on disk, then fails (a crash or a
    full disk in the middle of writing)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(28, "No space left on device (simulated crash mid-write)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


def _crash_writes_to(monkeypatch, name: str) -> None:
    """Make every file opened for writing whose name starts with `name` (results.json and any
    temp file next to it) tear mid-write, whichever way it is opened."""
    import builtins
    import io

    def torn_if_target(f, path):
        if Path(str(path)).name.startswith(name):
            return _TornWrite(f)
        return f

    real_open, real_fdopen = io.open, os.fdopen

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return torn_if_target(f, file) if any(c in mode for c in "wax+") and not isinstance(file, int) else f

    def fake_fdopen(fd, mode="r", *a, **k):
        path = os.readlink(f"/proc/self/fd/{fd}")
        f = real_fdopen(fd, mode, *a, **k)
        return torn_if_target(f, path) if any(c in mode for c in "wax+") else f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)


def test_crash_while_writing_results_leaves_no_complete_record(tmp_path, monkeypatch, tiny_cfg):
    """A crash in the middle of writing results.json leaves no results.json (no torn file in its
    place: temp file + rename) and no completion marker (it is written only after results.json),
    so resume runs the job again. Catches a non-atomic results.json write and a marker written
    before results.json."""
    from omegaconf import OmegaConf

    from dvlm_exp.run import record as rec_io
    from dvlm_exp.run import resume

    record = {"config": OmegaConf.to_container(tiny_cfg, resolve=True), "metrics": {"anls,none": 0.5},
              "pad": "x" * 10_000}
    ok = tmp_path / "ok"
    ok.mkdir()
    rec_io.write_results(ok, record)  # the same record written without a crash: resume would accept it
    assert resume.completed(ok, tiny_cfg) is not None

    run = tmp_path / "crashed"
    run.mkdir()
    _crash_writes_to(monkeypatch, "results.json")
    with pytest.raises(OSError, match="simulated crash"):
        rec_io.write_results(run, record)
    monkeypatch.undo()
    assert not (run / "results.json").exists(), (run / "results.json").read_text()[:200]
    assert not (run / ".dvlm_complete").exists()
    assert sorted(p.name for p in run.iterdir()) == []  # no temp file left behind either
    assert not rec_io.is_complete(run) and resume.completed(run, tiny_cfg) is None
