"""W&B runs grouped by sweep and tagged model / method / task / schedule, with the same summary keys in every
sweep (dvlm_exp/run/wandb_log.py). Real multiruns of the tiny model with WANDB_MODE=offline; the offline run
files are read back through wandb's own record reader (ecosystem.md §5.2: wandb.Api cannot read offline
runs; wandb 0.25 writes no config.yaml / wandb-summary.json offline). The multirun also checks
scripts/sweep_jobs.py's dry run against the run dirs Hydra actually made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SMALL = ["limit=1", "progress=false", "task.synthetic.n=2", "task.gen.gen_length=8", "task.gen.block_length=8",
         "task.gen.steps=4"]


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def read_offline_run(run_dir: Path) -> dict:
    """group, tags, name, config and summary of the one offline W&B run under run_dir/wandb."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    (path,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    ds = DataStore()
    ds.open_for_scan(str(path))
    out = {"summary": {}, "config": {}}
    while True:
        data = ds.scan_data()
        if data is None:
            break
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(group=rec.run.run_group, tags=list(rec.run.tags), name=rec.run.display_name)
            for item in rec.run.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((d for d in sweep_dir.iterdir() if d.is_dir() and (d / "results.json").exists()),
                  key=lambda d: int(d.name.split("_")[0]))


SUMMARY_KEYS = {"score", "score_metric", "keep_ratio", "prune_start", "prune_layer", "metric/anls", "synth_docvqa/anls",
                "flops/reduction", "flops/total", "tokens/kept_fraction", "timing/latency_s_per_sample", "memory/peak_bytes"}


def test_multirun_groups_by_sweep_name_else_sweep_dir(tmp_path):
    """One real multirun, two jobs: `sweep.name=smoke_tiny,null` gives a job of the sweep (group = its name)
    and one whose config has no sweep name (group = the Hydra sweep dir, as any plain multirun)."""
    sweep_dir = tmp_path / "sweep"
    extra = ["prune=fastv", "ratio=0.5", "sweep.name=smoke_tiny,null", "logger=wandb", "logger.tags=[nightly]", *SMALL]
    p = run_cli("-m", "+sweep=smoke_tiny", *extra, f"hydra.sweep.dir={sweep_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    dirs = job_dirs(sweep_dir)
    assert len(dirs) == 2

    # the dry run lists exactly the jobs Hydra launched, in launch order
    from dvlm_exp.run import sweep_jobs

    jobs, grid = sweep_jobs.expand("smoke_tiny", extra)
    assert grid == {"prune": 1, "ratio": 1, "sweep.name": 2}
    assert [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) for d in dirs] == jobs
    assert not any("+sweep" in d.name for d in dirs)  # sweeps/sweep/_base.yaml keeps `+sweep=` out of dir names

    for d, group in zip(dirs, ["smoke_tiny", str(sweep_dir)]):
        rec = json.loads((d / "results.json").read_text())
        w = read_offline_run(d)
        assert w["group"] == group
        assert set(w["tags"]) == {"model:tiny", "method:fastv", "task:synth_docvqa", "schedule:first_step", "nightly"} | (
            {"sweep:smoke_tiny"} if group == "smoke_tiny" else set())
        # <job num>_<override dirname> (logger.* keys are not in it), the dirname's tail when over 128 characters
        num, dirname = d.name.split("_", 1)
        assert w["name"] == f"{num}_{dirname[-(127 - len(num)):]}" and len(w["name"]) <= 128
        assert SUMMARY_KEYS <= set(w["summary"])
        assert w["summary"]["keep_ratio"] == rec["config"]["ratio"] == 0.5
        assert w["summary"]["score"] == pytest.approx(100 * rec["metrics"]["anls,none"])
        assert w["summary"]["flops/reduction"] == pytest.approx(rec["flops"]["reduction"])
        assert w["summary"]["prune_start"] == "step0" and w["summary"]["prune_layer"] == 2
        assert w["config"]["sweep"]["name"] == (group if group == "smoke_tiny" else None)
        assert rec["wandb"]["mode"] == "offline" and rec["wandb"]["group"] == group  # the report reads it

    # the W&B Report of these runs (scripts/report.py --wandb-report-spec, offline): a section per group, whose
    # run set selects the runs by the group and a tag they really carry
    spec_path = tmp_path / "wandb_report.json"
    p = subprocess.run([sys.executable, "scripts/report.py", str(sweep_dir), "--no-plots", "--out", str(tmp_path / "rep"),
                        "--wandb-report-spec", str(spec_path), "--wandb-entity", "me"], cwd=REPO, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    blocks = json.loads(spec_path.read_text())["spec"]["blocks"]
    heads = ["".join(c.get("text", "") for c in b["children"]) for b in blocks if b["type"] == "heading" and b["level"] == 2]
    assert heads == ["sweep smoke_tiny", f"sweep {sweep_dir}"]
    grids = [b for b in blocks if b["type"] == "panel-grid"]
    for d, grid, group in zip(dirs, grids, ["smoke_tiny", str(sweep_dir)]):
        (rs,) = grid["metadata"]["runSets"]
        leaves = {f["key"]["name"]: f["value"] for f in rs["filters"]["filters"]}
        assert leaves["group"] == group == read_offline_run(d)["group"]
        assert leaves["tags"] == ["method:fastv"] and "method:fastv" in read_offline_run(d)["tags"]


def test_group_name_and_tag_rules():
    """logger.group wins; then the sweep name; then the multirun sweep dir; a single run has no group."""
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.run.wandb_log import resolve_group, resolve_name, run_tags

    multi = {"multirun": True, "sweep_dir": "outputs/multirun/2026-01-01/10-00-00", "job_num": 3,
             "override_dirname": "prune=fastv,ratio=0.5", "choices": {"prune": "llada_fastv"}}
    cfg = compose_config(["model=tiny", "task=synth_docvqa", "logger=wandb", "prune=llada_fastv", "schedule=start_frac"])
    assert resolve_group(cfg, {}) is None and resolve_name(cfg, {}) is None
    assert resolve_group(cfg, multi) == multi["sweep_dir"]
    assert resolve_name(cfg, multi) == "3_prune=fastv,ratio=0.5"
    assert run_tags(cfg, multi) == ["model:tiny", "method:fastv", "task:synth_docvqa", "schedule:start_frac",
                                    "preset:llada_fastv"]
    assert resolve_group(cfg, {**multi, "sweep_dir": "x" * 300}) == "x" * 128  # W&B's limit: the tail is kept
    assert resolve_name(cfg, {**multi, "override_dirname": "y" * 300}) == "3_" + "y" * 126
    sp = f"hydra.searchpath=[file://{REPO / 'sweeps'}]"  # conf/config.yaml's is relative to the repo root
    swept = compose_config(["logger=wandb", "+sweep=study_table1", "model.path=/unused", sp])
    assert resolve_group(swept, multi) == "study_table1" and resolve_group(swept, {}) == "study_table1"
    assert "sweep:study_table1" in run_tags(swept, multi)
    own = compose_config(["logger=wandb", "+sweep=study_table1", "model.path=/unused", sp, "logger.group=mine",
                          "logger.name_=run7", "logger.tags=[a100]"])
    assert resolve_group(own, multi) == "mine" and resolve_name(own, multi) == "run7"
    assert run_tags(own, {})[-2:] == ["sweep:study_table1", "a100"]


def test_summary_names_are_task_independent():
    """Different tasks and methods give the same summary key set apart from lmms-eval's own <task>/<metric>."""
    from dvlm_exp.run.wandb_log import summary_metrics

    def rec(task, metrics, prune="fastv", ratio=0.5):
        return {"task": task, "metrics": metrics, "config": {"prune": {"name": prune, "layer": 3}, "ratio": ratio,
                                                            "schedule": {"name": "first_step"}},
                "flops": {"total": 2.0, "baseline_total": 4.0, "reduction": 0.5, "convention": "exact"},
                "tokens": {"visual_per_sample": [10, 10], "visual_kept_avg": 5.0}, "timing": {"latency_s_per_sample": 1.0}}

    mme = summary_metrics(rec("mme", {"mme_perception_score,none": 1500.0, "mme_cognition_score,none": 400.0}))
    doc = summary_metrics(rec("docvqa_val_llada_v", {"anls,none": 0.8}))
    vtw = summary_metrics(rec("pope", {"pope_accuracy,none": 0.85}, prune="vtw"))
    assert mme["score"] == 1900.0 and doc["score"] == pytest.approx(80.0) and vtw["score"] == pytest.approx(85.0)
    assert vtw["keep_ratio"] == 0.0 and doc["keep_ratio"] == 0.5
    common = {k for k in mme if "/" not in k or k.split("/")[0] in ("flops", "tokens", "timing", "memory")}
    assert common == {k for k in doc if "/" not in k or k.split("/")[0] in ("flops", "tokens", "timing", "memory")}
    assert {"score", "score_metric", "keep_ratio", "prune_start", "prune_layer", "flops/reduction",
            "tokens/kept_fraction"} <= common
    pred_only = summary_metrics(rec("video_dc499", {"bypass,none": 999}))
    assert pred_only["score"] is None and "missing" in pred_only["score_metric"]


def read_offline_records(path: Path) -> dict:
    """run id, resume flag and the keys of every history row of one offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    ds = DataStore()
    ds.open_for_scan(str(path))
    out = {"history": [], "summary": set()}
    while (data := ds.scan_data()) is not None:
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key) for item in rec.history.item})
        elif kind == "summary":
            out["summary"] |= {item.key or "/".join(item.nested_key) for item in rec.summary.update}
    return out


def test_requeued_job_is_the_same_run_and_summaries_are_not_history(tmp_path, monkeypatch):
    """A job run twice in its run dir (a requeued SLURM job) logs under one W&B run id, derived from the run
    dir (another run dir: another id); the summary values are the run's summary, not a one-point history
    (the history holds only the per-sample table)."""
    from dvlm_exp.run import build, runner
    from dvlm_exp.run.wandb_log import run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    cfg = build.compose_config(["model=tiny", "task=synth_docvqa", "logger=wandb", "prune=fastv", *SMALL])
    a, b = tmp_path / "job_a", tmp_path / "job_b"
    for d in (a, a, b):  # job a runs, is requeued into the same dir; job b is another job
        d.mkdir(exist_ok=True)
        rec = runner.run(cfg, d)
        assert rec["wandb"]["run_id"] == run_id(d)
    import wandb

    wandb.teardown()  # the service writes the run files asynchronously: flush them before reading
    runs_a = sorted((a / "wandb").glob("offline-run-*/run-*.wandb"))
    (run_b,) = (b / "wandb").glob("offline-run-*/run-*.wandb")
    assert len(runs_a) == 2
    ids = [read_offline_records(p)["run_id"] for p in runs_a]
    assert ids[0] == ids[1] == run_id(a) == run_id(tmp_path / "x" / ".." / "job_a")
    assert read_offline_records(run_b)["run_id"] == run_id(b) != run_id(a)
    w = read_offline_records(runs_a[0])
    assert SUMMARY_KEYS <= w["summary"]
    logged = set().union(*w["history"]) if w["history"] else set()
    assert "synth_docvqa/samples/_type" in logged  # the per-sample table
    assert not logged & SUMMARY_KEYS, logged & SUMMARY_KEYS
    monkeypatch.setenv("WANDB_RUN_ID", "my-own-id")  # wandb's own setting wins
    assert run_id(a) == "my-own-id"


def test_online_run_resumes_its_id(tmp_path, monkeypatch):
    """Online, wandb.init gets the run dir's id and resume="allow" (WANDB_RESUME when set); offline no resume
    (wandb ignores it there and warns)."""
    import wandb

    from dvlm_exp.run import build, wandb_log

    seen = []

    class Stop(BaseException):  # not caught by the sink's `except Exception`
        pass

    def fake_init(**k):
        seen.append(k)
        raise Stop

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(wandb_log, "online_problem", lambda *a, **k: None)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    cfg = build.compose_config(["model=tiny", "task=synth_docvqa", "logger=wandb", "logger.mode=online"])
    for mode, resume_env, want in (("online", None, "allow"), ("online", "must", "must"), ("offline", None, None)):
        cfg.logger.mode = mode
        if resume_env:
            monkeypatch.setenv("WANDB_RESUME", resume_env)
        with pytest.raises(Stop):
            wandb_log.WandbSink(cfg, {}, tmp_path)
        assert seen[-1]["id"] == wandb_log.run_id(tmp_path) and seen[-1].get("resume") == want
