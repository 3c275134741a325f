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
# config-only checkpoints (model_type + depth) of the other released models the sweeps run
CONFIGS = {"llada_v": CONFIG_8B, "lavida_dream": REPO / "tests" / "data" / "lavida_dream_config.json",
           "lavida_llada": REPO / "tests" / "data" / "lavida_llada_config.json",
           "llava_1_5": REPO / "tests" / "data" / "llava_1_5_7b_config.json"}
IGNORES_RATIO = {"none", "vtw", "visipruner", "skip"}


@pytest.fixture(scope="module")
def sj():
    from dvlm_exp.run import sweep_jobs

    return sweep_jobs


@pytest.fixture(scope="module")
def fake_ckpts(tmp_path_factory):
    out = {}
    for model, cfg in CONFIGS.items():
        d = tmp_path_factory.mktemp(f"{model}_config_only")
        shutil.copy(cfg, d / "config.json")  # validation reads config.json only (model depth)
        out[model] = d
    # TRIM's text tower (study_table1): google/siglip-so400m-patch14-384's config (dims as released) and an
    # empty tokenizer file; validation reads config.json and looks for the tokenizer only
    d = tmp_path_factory.mktemp("siglip_config_only")
    shutil.copy(REPO / "tests" / "data" / "siglip_so400m_config.json", d / "config.json")
    (d / "spiece.model").write_bytes(b"")
    out["text_tower"] = d
    return out


@pytest.fixture(scope="module")
def fake_ckpt(fake_ckpts):
    return fake_ckpts["llada_v"]


def test_expected_sweeps_exist(sj):
    assert sj.list_sweeps() == NAMES
    for name in ("study_table1", "study_table1_vtw", "study_table3", "study_table3_short", "llada_v_baseline",
                 "llada_fastv_grid", "redvtp_ratios", "smoke_tiny",
                 # issue 17: the LaViDa-Dream, AR-baseline and LaViDa Prefix-DLM tables
                 "study_table2", "study_table2_vtw", "lavida_dream_baseline", "llava15_baseline", "fastv_readme",
                 "llava15_token_reduction", "llava15_visipruner", "lavida_prefix_nfe", "redvtp_lavida"):
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
def test_every_job_validates(sj, name, fake_ckpts, study_gen_by_model):
    """... and, in the study's sweeps, runs with the study's generation setting for its benchmark and model;
    on the AR baselines, with the lmms-eval task's max_new_tokens."""
    cfg = sj.compose([f"+sweep={name}"])
    extra = [f"model.path={fake_ckpts.get(cfg.model.name, fake_ckpts['llada_v'])}"] if cfg.model.get("tiny") is None else []
    if "text_tower_path" in cfg.model:  # the user's required override for TRIM's jobs (sweep headers)
        extra.append(f"model.text_tower_path={fake_ckpts['text_tower']}")
    study_gen = study_gen_by_model.get(cfg.model.name)
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
        if jcfg.model.get("family") in AR_FAMILIES:
            g = jcfg.task.gen
            assert g.gen_length == lmms_max_new_tokens(str(jcfg.task.lmms_task)), job
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


AR_FAMILIES = {"llava_1_5", "llava_next"}


def lmms_max_new_tokens(lmms_task: str) -> int:
    """The lmms-eval task's generation_kwargs.max_new_tokens (a group: its first member), else lmms-eval's
    llava default (lmms_eval/models/simple/llava.py generate_until: 1024)."""
    from dvlm_exp.evaluation.task_data import load_task_yaml, task_specs

    d = load_task_yaml(task_specs(lmms_task)[0].yaml_path)
    return int((d.get("generation_kwargs") or {}).get("max_new_tokens") or 1024)


# the study's abbreviations (published.yaml generation_settings) -> our task presets
STUDY_TASKS = {"MME": "mme", "SQA": "scienceqa_img", "GQA": "gqa", "POPE": "pope", "MMB": "mmbench_en_dev",
               "TextVQA": "textvqa_val", "MMMU-Pro(V)": "mmmu_pro", "VideoMME": "videomme", "ChartQA": "chartqa",
               "DocVQA": "docvqa_val", "InfoVQA": "infovqa_val", "Video Detail Caption": "video_dc499"}


STUDY_MODELS = {"LLaDA-V": "llada_v", "LaViDa-Dream": "lavida_dream"}


@pytest.fixture(scope="module")
def study_gen_by_model():
    """{model: {task name: (gen_length, block_length, steps, think)}} of the study's runs (suppl. Tab. 1)."""
    import yaml

    paper = next(p for p in yaml.safe_load(PUBLISHED.read_text())["papers"] if p["key"] == "dmllm_redundancy_study")
    want: dict[str, dict] = {}
    for g in paper["generation_settings"]:
        for b in g["benchmarks"].split(", "):
            task = STUDY_TASKS["MMMU-Pro(V)" if b == "MMMU-Pro" else b]
            want.setdefault(STUDY_MODELS[g["model"]], {})[task] = (
                g["gen_length"], g["block_length"], g["steps"], "think" if g["think"] else "no_think")
    return want


@pytest.fixture(scope="module")
def study_gen(study_gen_by_model):
    """{task preset: (gen_length, block_length, steps, think)} of the study's LLaDA-V runs (suppl. Tab. 1)."""
    return study_gen_by_model["llada_v"]


@pytest.mark.parametrize("model", sorted(STUDY_MODELS.values()))
def test_study_sweeps_cover_every_study_benchmark(sj, study_gen_by_model, model):
    tasks = set()
    for name in NAMES:
        cfg = sj.compose([f"+sweep={name}"])
        if cfg.sweep.get("paper") == "dmllm_redundancy_study" and cfg.model.name == model:
            tasks |= {o.split("=", 1)[1] for job in sj.expand(name)[0] for o in job if o.startswith("task=")}
    # presets -> the task names the generation settings are keyed by (sweeps/task/dream_<task>.yaml)
    names = {"chartqa" if t == "chartqa_study" else t.removeprefix("dream_") for t in tasks}
    # LLaDA-V: every benchmark of suppl. Tab. 1; LaViDa-Dream: those of Table 2 (its Table 3 rows, DocVQA /
    # InfoVQA at 25 / 50 / 75 % of the steps, have no sweep yet)
    from dvlm_exp.reporting.report import BENCHMARK_LABELS, MODEL_LABELS, load_published

    rows, _ = load_published(PUBLISHED)
    tables = ("table1", "table2", "table3") if model == "llada_v" else ("table2",)
    shown = {r["benchmark"] for r in rows if r["model"] == MODEL_LABELS[model] and r["table"] in tables}
    want = {t for t in study_gen_by_model[model] if set(BENCHMARK_LABELS[t]) & shown}
    assert names == want and len(want) >= 8
    assert "chartqa_study" in tasks  # the study's 8-step ChartQA (sweeps/task/chartqa_study.yaml)


def test_ar_presets_follow_lmms_eval(sj):
    """Every AR task preset (sweeps/task/llava_*.yaml) asks for the lmms-eval task's max_new_tokens, and the
    study's LaViDa-Dream presets (dream_*.yaml) keep their base task's name and lmms-eval task."""
    presets = sorted(p.stem for p in (REPO / "sweeps" / "task").glob("llava_*.yaml"))
    assert len(presets) == 13
    for p in presets:
        cfg = sj.compose([f"task={p}", "model=tiny_llava"])
        assert cfg.task.gen.gen_length == lmms_max_new_tokens(str(cfg.task.lmms_task)), p
    for p in sorted(x.stem for x in (REPO / "sweeps" / "task").glob("dream_*.yaml")):
        cfg, base = sj.compose([f"task={p}"]), sj.compose([f"task={p.removeprefix('dream_')}"])
        assert (cfg.task.name, cfg.task.lmms_task) == (base.task.name, base.task.lmms_task)


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
