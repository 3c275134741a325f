"""run.py as a researcher uses it (issue 18 items 1, 3, 8, 9): from another working directory, sweeps
checked job by job before anything runs, failed jobs named, readable outputs with a real run.log,
one run dir per run, the prune preset printed and recorded. Every CLI test is a subprocess run from
a temporary working directory, outputs redirected with DVLM_OUTPUTS."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = str(REPO / "run.py")


def cli(args, cwd: Path, out: Path, umask: int | None = None, timeout: int = 600, **env_extra):
    env = {**os.environ, "DVLM_OUTPUTS": str(out), **env_extra}
    env.pop("HYDRA_FULL_ERROR", None)
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, RUN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=pre)


def _dirs(tmp_path):
    cwd, out = tmp_path / "elsewhere", tmp_path / "out"
    cwd.mkdir()
    return cwd, out


def test_sweep_from_another_directory_runs_every_job(tmp_path):
    """Item 1: `python /path/to/run.py -m +sweep=smoke_tiny` from another directory runs the sweep's 4 jobs
    (sweeps/ found from the package), into the project's outputs (here DVLM_OUTPUTS), not one default job."""
    cwd, out = _dirs(tmp_path)
    r = cli(["-m", "+sweep=smoke_tiny", "model=sandbox", "task=synth_shapes", "limit=1", "progress=false"], cwd, out)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((out / "sweeps" / "smoke_tiny").glob("*/results.json"))
    assert len(runs) == 4, (runs, r.stdout[-2000:])
    jobs = {(rec["config"]["prune"]["name"], rec["config"]["ratio"]) for rec in map(json.loads, (p.read_text() for p in runs))}
    assert jobs == {("fastv", 0.5), ("fastv", 0.25), ("random", 0.5), ("random", 0.25)}
    assert all(json.loads(p.read_text())["config"]["sweep"]["name"] == "smoke_tiny" for p in runs)
    assert list(cwd.iterdir()) == []  # nothing written into the working directory
    assert "is not available" not in r.stderr  # Hydra's search-path warning


def test_unknown_sweep_is_an_error_from_any_directory(tmp_path):
    cwd, out = _dirs(tmp_path)
    r = cli(["-m", "+sweep=smoke_tinyy", "limit=1"], cwd, out, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-1000:])
    assert r.stderr.startswith("error: sweep=smoke_tinyy: no config"), r.stderr
    assert "did you mean sweep=smoke_tiny?" in r.stderr and "sweeps/sweep/" in r.stderr
    assert not out.exists() and list(cwd.iterdir()) == []


def test_multirun_with_bad_jobs_lists_them_all_and_runs_none(tmp_path):
    """Item 3: every job is checked before the first starts; all bad jobs named at once."""
    cwd, out = _dirs(tmp_path)
    r = cli(["-m", "prune=fastv", "prune.layer=9,2,7", "limit=1"], cwd, out, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr
    assert err.startswith("error: 2 of 3 jobs of the multirun are invalid, so none was started"), err
    assert "job #0 (prune=fastv prune.layer=9 limit=1): prune.layer=9 is outside [1, 3]" in err
    assert "job #2 (prune=fastv prune.layer=7 limit=1): prune.layer=7 is outside [1, 3]" in err
    assert "Traceback" not in err and not out.exists()  # no sweep dir, nothing ran


def test_multirun_job_failing_at_run_time_lets_the_others_run_and_is_named(tmp_path):
    """Item 3 (the other half): a job that fails while running writes failed.json, the others run, the
    multirun exits non-zero and names every failed job."""
    cwd, out = _dirs(tmp_path)
    r = cli(["-m", "prune=none,random,fastv", "limit=1", "progress=false"], cwd, out,
            DVLM_FAIL_AFTER_SAMPLES="0", DVLM_FAIL_ONLY="prune=random")
    assert r.returncode != 0
    sweep = next((out / "multirun").glob("*/*"))
    assert sorted(p.parent.name.split("_")[0] for p in sweep.glob("*/results.json")) == ["0", "2"]
    assert [p.parent.name.split("_")[0] for p in sweep.glob("*/failed.json")] == ["1"]
    assert "error: 1 job(s) of the multirun failed (the others ran):" in r.stderr, r.stderr[-2000:]
    assert "1_limit=1,progress=False,prune=random: RuntimeError: DVLM_FAIL_AFTER_SAMPLES=0" in r.stderr


def test_single_run_outputs_log_modes_and_preset(tmp_path):
    """Items 8 and 9 on one sandbox run from another directory: group-readable files (umask 002),
    the summary in run.log, the preset name and its non-default values printed and recorded."""
    cwd, out = _dirs(tmp_path)
    r = cli(["prune=sandbox_fastv", "ratio=0.1", "limit=1", "progress=false"], cwd, out, umask=0o002)
    assert r.returncode == 0, r.stderr[-3000:]
    head = "dvlm_exp | model=sandbox prune=sandbox_fastv (fastv; non-default query_set=masked_response; layer=2, ratio=0.1)"
    assert head in r.stdout, r.stdout[-2000:]
    (run_dir,) = [p.parent for p in (out / "runs").glob("*/*/results.json")]
    rec = json.loads((run_dir / "results.json").read_text())
    assert rec["prune_preset"] == {"preset": "sandbox_fastv", "method": "fastv", "non_default": {"query_set": "masked_response"}}
    for name in ("results.json", "predictions.jsonl", ".dvlm_complete"):
        mode = stat.S_IMODE((run_dir / name).stat().st_mode)
        assert mode == 0o664, (name, oct(mode))  # mkstemp's 0600 before
    log = (run_dir / "run.log").read_text()
    assert head in log and f"results   {run_dir / 'results.json'}" in log, log
    assert list(cwd.iterdir()) == []


def test_method_defaults_named_in_summary(tmp_path):
    """Item 8: `prune=fastv` says it ran FastV's own defaults (no hidden preset)."""
    from dvlm_exp.run import build, runner

    cfg = build.compose_config(["prune=fastv", "prune.layer=3"])
    info = runner.prune_preset(cfg)
    assert info == {"preset": "fastv", "method": "fastv", "non_default": {"layer": 3}}
    c = {"prune": dict(cfg.prune), "ratio": cfg.ratio}
    assert runner._prune_text(c, info) == "fastv (non-default layer=3; layer=3, ratio=0.5)"
    cfg = build.compose_config(["prune=fastv"])
    assert runner._prune_text({"prune": dict(cfg.prune), "ratio": 0.5}, runner.prune_preset(cfg)) == \
        "fastv (method defaults; layer=2, ratio=0.5)"


def test_config_error_leaves_no_run_dir(tmp_path):
    """Item 9: a bad value is refused before Hydra makes a run dir (no dir holding failed.json)."""
    import torch

    cwd, out = _dirs(tmp_path)
    cases = [(["seed=1.5"], "error: seed=1.5 must be a non-negative integer"),
             (["schedule=at_step", "schedule.step=4"], "error: schedule.step=4 is outside [0, 3]"),
             (["prune=fastvv"], "error: prune=fastvv: no config 'fastvv' in group 'prune' (did you mean prune=fastv?)"),
             (["model=lavida_llada", "model.path=/nonexistent/lavida"],
              "error: model.path=/nonexistent/lavida is not a directory: download it "
              "(`hf download jacklishufan/lavida-llada-v1.0-instruct --local-dir /nonexistent/lavida`)")]
    if not torch.cuda.is_available():
        cases.append((["model.device=cuda"], "error: model.device=cuda but torch"))
    for args, msg in cases:
        r = cli(args, cwd, out, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith(msg), (args, r.stderr[-1000:])
        assert "Traceback" not in r.stderr
    assert not out.exists() and list(cwd.iterdir()) == []


def test_default_run_dirs_are_never_shared(tmp_path, monkeypatch):
    """Item 9: two runs composed in the same second (same ${now:...}) get two run dirs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.setenv("DVLM_OUTPUTS", str(tmp_path / "out"))
    for _ in range(5):
        dirs = []
        for _ in range(2):
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                hc = compose(config_name="config", return_hydra_config=True)
            dirs.append((OmegaConf.select(hc, "hydra.run.dir"), time.strftime("%H-%M-%S")))
        if dirs[0][1] == dirs[1][1]:
            break
    (a, sa), (b, sb) = dirs
    assert a != b and Path(a).is_dir() and Path(b).is_dir(), dirs
    if sa == sb and Path(a).name == sa:  # the same second: the second run is told apart
        assert b == a + "-2", dirs


def test_outputs_default_to_the_project(monkeypatch):
    """Item 1: without DVLM_OUTPUTS, runs go to the project's outputs/, whatever the working directory."""
    from dvlm_exp.run import paths

    monkeypatch.delenv("DVLM_OUTPUTS", raising=False)
    monkeypatch.chdir("/")
    assert paths.outputs_dir() == REPO / "outputs"
    assert paths.project_root() == REPO and (paths.project_root() / "sweeps" / "sweep").is_dir()
