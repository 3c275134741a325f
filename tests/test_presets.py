"""Every method and schedule preset composes from the CLI grammar, passes the pre-load checks,
builds, and generates on the tiny model; the methods whose defaults fit the tiny model also run
end to end through run.py in one multirun."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from conftest import REPO

PRUNES = sorted(p.stem for p in (REPO / "conf" / "prune").glob("*.yaml"))
SCHEDULES = sorted(p.stem for p in (REPO / "conf" / "schedule").glob("*.yaml"))
TINY_DEPTH = 4


def _fit_tiny(name: str) -> list[str]:
    """Overrides that move a preset's layer fields into the tiny model's 4 layers."""
    from omegaconf import OmegaConf

    from dvlm_exp.registry import PRUNERS

    cfg = OmegaConf.load(REPO / "conf" / "prune" / f"{name}.yaml")
    out = []
    for key, lo in PRUNERS.get(cfg.name).layer_fields.items():
        if key not in cfg:
            continue
        val = cfg[key]
        if OmegaConf.is_list(val):
            fit = sorted({min(max(int(v), lo), TINY_DEPTH - 1) for v in val})
            out.append(f"prune.{key}=[{','.join(map(str, fit))}]")
        elif int(val) > TINY_DEPTH - 1 or int(val) < lo:
            out.append(f"prune.{key}={min(max(int(val), lo), TINY_DEPTH - 1)}")
    return out


def test_every_yaml_names_a_registered_class_and_every_class_has_a_yaml():
    """conf/<group>/*.yaml <-> the classes registered in their own files, both ways."""
    from dvlm_exp.registry import MODEL_FAMILIES, PRUNERS, SCHEDULES as SCHED
    from omegaconf import OmegaConf

    named = {OmegaConf.load(REPO / "conf" / "prune" / f"{name}.yaml").name for name in PRUNES}
    assert named == set(PRUNERS.names())
    for name in named:
        assert PRUNERS.get(name).__module__ == f"dvlm_exp.pruning.{name}"
    # schedules: file name = yaml name = registered name
    assert set(SCHEDULES) == set(SCHED.names())
    for name in SCHEDULES:
        assert OmegaConf.load(REPO / "conf" / "schedule" / f"{name}.yaml").name == name
        assert SCHED.get(name).__module__ == f"dvlm_exp.schedules.{name}"
    families = {OmegaConf.load(p).get("family") for p in (REPO / "conf" / "model").glob("*.yaml")} - {None}
    assert families <= set(MODEL_FAMILIES.names())


@pytest.fixture(scope="module")
def text_tower_dir(tmp_path_factory):
    """TRIM's SigLIP text tower for the tiny model (dvlm_exp/models/tiny_text_tower.py)."""
    from dvlm_exp.models.tiny_text_tower import write_tiny_text_tower

    return write_tiny_text_tower(tmp_path_factory.mktemp("siglip_text_tiny"), dim=32)


@pytest.mark.parametrize("prune", PRUNES)
def test_prune_preset_composes_checks_and_generates(prune, tiny_model, doc_images, text_tower_dir):
    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.run.build import build_pruner, build_schedule, compose_config
    from dvlm_exp.run.validate import check

    tower = ["model=tiny", f"model.text_tower_path={text_tower_dir}"] if prune == "trim" else []  # tiny_model's tower: 32
    cfg = compose_config([f"prune={prune}", "ratio=0.5", *_fit_tiny(prune), *tower])
    check(cfg, data=False)
    if tower:
        from dvlm_exp.models.text_tower import TextTower

        object.__setattr__(tiny_model, "text_tower", TextTower.from_pretrained(text_tower_dir))
    pruner = build_pruner(cfg)
    preset = GenPreset(gen_length=8, block_length=8, steps=4, think=None, stop=[])
    gen = Generator(tiny_model, pruner, build_schedule(cfg), preset,
                    position_ids=cfg.prune.get("position_ids", "keep"), seed=0)
    gen.generate("What is the total?", [doc_images[0]], sample_id=0)
    rec = gen.recorder.samples[-1]
    assert len(rec.output_ids) == 8 and rec.n_forwards == 4
    # every method changes what some layer sees, at some step (VisiPruner's thresholds are on
    # LLaVA's scale and adaptive: on the random tiny model they may never fire)
    if getattr(pruner, "tower_stage", None):  # acts before the LLM: every layer sees the reduced set
        full, _ = tiny_model.prepare(tiny_model.prompt_ids("What is the total?"), [doc_images[0]], 8)
        assert set(rec.kept_by_step_layer.values()) == {rec.n_visual} and rec.n_visual < full.n_visual(), prune
    elif prune not in ("none", "visipruner"):
        n = rec.n_visual
        assert any(v != n for v in rec.kept_by_step_layer.values()), prune


# README "Schedules" table, restated: the acting steps of each preset for S total steps (global
# steps, 0-based), and what persists. confidence depends on the run: see _CONFIDENCE below.
def _floor_frac(f: str, S: int) -> int:
    return math.floor(Fraction(f) * S)


README_STEPS = {
    "first_step": lambda S: [0],
    "at_step": lambda S: [3],                                                   # schedule.step=3
    "start_frac": lambda S: [_floor_frac("0.5", S)],                            # frac default 0.5
    "late_step": lambda S: [_floor_frac("0.75", S)],                            # f = 0.75
    "progressive": lambda S: sorted({_floor_frac(f, S) for f in ("0", "0.25", "0.5", "0.75")}),
    "every_step": lambda S: list(range(0, S)),                                  # start default 0
}
README_PERSIST = {"first_step": "state", "at_step": "state", "start_frac": "state", "late_step": "state",
                  "progressive": "state", "every_step": "none", "confidence": "state"}
# mean top-1 probability observed after each step; the default threshold 0.5 is first reached
# after step 3, so confidence acts once, at step 4
_CONFIDENCE = [0.1, 0.3, 0.49, 0.5, 0.2, 0.9] + [0.95] * 60


def _acting_steps(sched, S: int) -> list[int]:
    """Drive a schedule in the sampler's order (sampler.py / engine.py): the step's forward asks
    acts_at in every layer, then the step's confidence is observed, then after_step asks acts_at
    again. All asks of one step must agree."""
    sched.begin(S)
    acted = []
    for step in range(S):
        forward = [sched.acts_at(step) for _layer in range(2)]
        if hasattr(sched, "observe"):
            sched.observe(step, _CONFIDENCE[step])
        after = sched.acts_at(step)
        assert forward == [after, after], (step, forward, after)
        if after:
            acted.append(step)
    return acted


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_preset_acts_at_the_documented_steps(schedule):
    """Each schedule preset, and its class built with defaults only (e.g. `~schedule.frac`), acts
    at the steps of the README table for several total step counts S. Catches a wrong default
    fraction (late_step 0.75), an off-by-one start (every_step), a floor turned into rounding,
    a confidence start that is not the step after the threshold is reached."""
    from dvlm_exp.registry import SCHEDULES as SCHED
    from dvlm_exp.run.build import build_schedule, compose_config
    from dvlm_exp.run.validate import check

    extra = ["schedule.step=3"] if schedule == "at_step" else []
    cfg = compose_config(["prune=fastv", f"schedule={schedule}", *extra])
    check(cfg, data=False)
    builds = {"preset": build_schedule(cfg),
              "class defaults": SCHED.get(cfg.schedule.name)(**({"step": 3} if schedule == "at_step" else {}))}
    for how, sched in builds.items():
        assert sched.persist == README_PERSIST[schedule], how
        for S in (4, 7, 10, 16, 63, 64):
            if schedule == "confidence":
                want = [4] if S > 4 else []
            else:
                want = README_STEPS[schedule](S)
            assert _acting_steps(sched, S) == want, (how, S)
            assert sched.steps() == want, (how, S)  # what plans and reports list


def test_progressive_keep_ratio_falls_linearly_to_ratio():
    """progressive: at stage i of n (step floor(f_i * S)) keep 1 - (1 - ratio) * (i + 1) / n of the
    original visual tokens, reaching `ratio` at the last stage; before a stage nothing changes."""
    from dvlm_exp.schedules.progressive import Progressive

    sched = Progressive()
    sched.begin(16)  # stages at 0, 4, 8, 12
    assert [sched.ratio_at(s, 0.25) for s in (0, 3, 4, 8, 11, 12, 15)] == [0.8125, 0.8125, 0.625, 0.4375, 0.4375, 0.25, 0.25]
    late = Progressive(fracs=[0.5, 0.75])
    late.begin(8)  # stages at 4, 6
    assert [late.ratio_at(s, 0.5) for s in (0, 3, 4, 6, 7)] == [1.0, 1.0, 0.75, 0.5, 0.5]


@pytest.mark.parametrize("args,needle", [
    (["prune=sparsevlm"], "prune.layers=[2, 6, 15] is outside [1, 3]"),
    (["prune=vtw", "prune.layer=9"], "prune.layer=9 is outside [0, 3]"),
    (["prune=divprune", "prune.pivot=middle"], "prune.pivot=middle must be one of paper, random"),
    (["prune=fastv", "prune.rounding=ceil"], "prune.rounding=ceil must be one of round, floor"),
    (["prune=fastv", "schedule=start_frac", "schedule.frac=1.5"], "schedule.frac=1.5 must be a fraction"),
    (["prune=fastv", "schedule=progressive", "schedule.fracs=[0.5,0.25]"], "must be increasing fractions"),
    (["prune=fastv", "schedule=confidence", "schedule.threshold=0"], "schedule.threshold=0 must be in (0, 1]"),
    (["prune=fastv", "schedule.persist=forever"], "schedule.persist=forever must be state, replay or none"),
])
def test_bad_method_and_schedule_settings_fail_before_loading(args, needle):
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    with pytest.raises(ConfigError) as e:
        check(compose_config(args), data=False)
    assert needle in str(e.value)


def test_methods_run_end_to_end_through_the_cli(tmp_path, text_tower_dir):
    from test_cli import check_record, run_cli

    fits = [p for p in PRUNES if p != "none" and not _fit_tiny(p)]
    assert {"fastv", "random", "redvtp", "trim"} <= set(fits)
    p = run_cli("-m", "model=tiny", "task=synth_docvqa", f"prune={','.join(fits)}", "ratio=0.5", "limit=1",
                f"hydra.sweep.dir={tmp_path}", f"model.text_tower_path={text_tower_dir}", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in Path(tmp_path).iterdir() if (d / "results.json").exists())
    assert len(jobs) == len(fits)
    for d in jobs:
        rec = check_record(d, json.loads((d / "results.json").read_text())["config"]["prune"]["name"])
        assert rec["flops"]["total"] < rec["flops"]["baseline_total"], d.name
