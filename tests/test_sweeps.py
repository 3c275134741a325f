"""sweeps/: every paper-table sweep composes, its job count is the product of its grid sizes (and the count
its header states), every job's config composes and passes dvlm_exp.run.validate.check(cfg, data=False)
(model=llada_v with a fake checkpoint dir holding only the 8B config.json), no two jobs of a sweep differ
only in a value their method ignores, and the study's sweeps carry the study's generation settings
(published.yaml). Also the dry-run CLI, scripts/sweep_jobs.py.

The expansion is Hydra's own (BasicSweeper.split_arguments over hydra.sweeper.params + the command line);
test_wandb_group.py checks it against the run dirs of a real multirun.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from dvlm_exp.reporting.report import PUBLISHED  # shipped in the package

SWEEP_DIR = REPO / "sweeps" / "sweep"
NAMES = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml") if not p.name.startswith("_"))
CONFIG_8B = REPO / "tests" / "data" / "llada_v_8b_config.json"
IGNORES_RATIO = {"none", "vtw", "visipruner", "skip"}


@pytest.fixture(scope="module")
def sj():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import sweep_jobs
    finally:
        sys.path.pop(0)
    return sweep_jobs


@pytest.fixture(scope="module")
def fake_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("llada_v_config_only")
    shutil.copy(CONFIG_8B, d / "config.json")  # validation reads config.json only (model depth)
    return d


def test_expected_sweeps_exist(sj):
    assert sj.list_sweeps() == NAMES
    for name in ("study_table1", "study_table1_vtw", "study_table3", "study_table3_short", "llada_v_baseline",
                 "llada_fastv_grid", "redvtp_ratios", "smoke_tiny"):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_sweep_composes_and_counts(sj, name):
    cfg = sj.compose([f"+sweep={name}"], hydra=True)
    assert cfg.sweep.name == name
    params = dict(cfg.hydra.sweeper.params)
    assert params, f"{name}: no hydra.sweeper.params"
    sizes = {k: len(str(v).split(",")) for k, v in params.items()}
    jobs, grid = sj.expand(name)
    assert len(jobs) == math.prod(sizes.values()) == math.prod(grid.values())
    assert grid == sizes
    assert len({tuple(sorted(j)) for j in jobs}) == len(jobs)
    assert all(f"+sweep={name}" in j for j in jobs)
    h = sj.header(name)
    assert int(re.match(r"(\d+)", h["jobs"]).group(1)) == len(jobs), h["jobs"]
    assert f"+sweep={name}" in h["command"] and h["command"].startswith("python run.py -m")
    assert h["dry run"] == f"python scripts/sweep_jobs.py {name}"
    assert h["paper"]
    # a command-line value replaces the sweep's axis, as in Hydra's BasicSweeper
    key = next(iter(params))
    first = str(params[key]).split(",")[0]
    jobs1, _ = sj.expand(name, [f"{key}={first}"])
    assert len(jobs1) == len(jobs) // sizes[key]


@pytest.mark.parametrize("name", NAMES)
def test_every_job_validates(sj, name, fake_ckpt, study_gen):
    """... and, in the study's sweeps, runs with the study's generation setting for its benchmark."""
    cfg = sj.compose([f"+sweep={name}"])
    extra = [f"model.path={fake_ckpt}"] if cfg.model.get("tiny") is None else []
    study = cfg.sweep.get("paper") == "dmllm_redundancy_study"
    jobs, _ = sj.expand(name)
    identities = set()
    for job, jcfg in sj.job_configs(jobs, extra):
        assert sj.check_config(jcfg) is None, (job, sj.check_config(jcfg))
        assert jcfg.limit == (2 if name == "smoke_tiny" else None)  # whole splits for the papers' tables
        # llada_v_baseline also runs the official ChartQA preset (16 steps), the reference of the other grids
        if study and study_gen and "task=chartqa" not in job:
            g = jcfg.task.gen
            assert (g.gen_length, g.block_length, g.steps, g.think) == study_gen[jcfg.task.name], job
        ident = _container(jcfg)
        if ident["prune"]["name"] in IGNORES_RATIO:
            ident.pop("ratio")
        identities.add(json.dumps(ident, sort_keys=True, default=str))
    assert len(identities) == len(jobs), f"{name}: jobs that differ only in a value their method ignores"


def test_fast_composition_equals_full_compose(sj, fake_ckpt):
    """job_configs shares one composition per config-group choice; the result equals composing each job."""
    from omegaconf import OmegaConf

    for name in ("llada_fastv_grid", "study_table3"):
        jobs, _ = sj.expand(name)
        pick = [jobs[0], jobs[len(jobs) // 2], jobs[-1]]
        for job, cfg in sj.job_configs(pick, [f"model.path={fake_ckpt}"]):
            full = sj.compose([*job, f"model.path={fake_ckpt}"])
            assert OmegaConf.to_container(cfg) == OmegaConf.to_container(full), job


def _container(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


# the study's abbreviations (published.yaml generation_settings) -> our task presets
STUDY_TASKS = {"MME": "mme", "SQA": "scienceqa_img", "GQA": "gqa", "POPE": "pope", "MMB": "mmbench_en_dev",
               "TextVQA": "textvqa_val", "MMMU-Pro(V)": "mmmu_pro", "VideoMME": "videomme", "ChartQA": "chartqa",
               "DocVQA": "docvqa_val", "InfoVQA": "infovqa_val", "Video Detail Caption": "video_dc499"}


@pytest.fixture(scope="module")
def study_gen():
    """{task preset: (gen_length, block_length, steps, think)} of the study's LLaDA-V runs (suppl. Tab. 1)."""
    import yaml

    paper = next(p for p in yaml.safe_load(PUBLISHED.read_text())["papers"] if p["key"] == "dmllm_redundancy_study")
    want = {}
    for g in paper["generation_settings"]:
        if g["model"] == "LLaDA-V":
            for b in g["benchmarks"].split(", "):
                want[STUDY_TASKS[b]] = (g["gen_length"], g["block_length"], g["steps"], "think" if g["think"] else "no_think")
    return want


def test_study_sweeps_cover_every_study_benchmark(sj, study_gen):
    tasks = set()
    for name in NAMES:
        if sj.compose([f"+sweep={name}"]).sweep.get("paper") == "dmllm_redundancy_study":
            tasks |= {o.split("=", 1)[1] for job in sj.expand(name)[0] for o in job if o.startswith("task=")}
    assert {"chartqa" if t == "chartqa_study" else t for t in tasks} == set(study_gen)
    assert "chartqa_study" in tasks  # the study's 8-step ChartQA (sweeps/task/chartqa_study.yaml)


def test_sweep_jobs_cli(fake_ckpt):
    p = subprocess.run([sys.executable, "scripts/sweep_jobs.py", "study_table3_short", f"model.path={fake_ckpt}",
                        "task=mme,pope", "--check"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["jobs"] == 8 and summary["errors"] == 0 and summary["grid"] == {"prune": 4, "task": 2}
    assert lines[0].startswith("study_table3_short: 8 jobs")
    assert sum(1 for ln in lines if re.match(r"\s+\d+\s+prune=", ln)) == 8
    # without a checkpoint every llada_v job fails validation with the model.path error
    p = subprocess.run([sys.executable, "scripts/sweep_jobs.py", "redvtp_ratios", "--check"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and json.loads(p.stdout.strip().splitlines()[-1])["errors"] == 9
    assert "needs model.path" in p.stdout
