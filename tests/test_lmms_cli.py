"""lmms-eval's own CLI runs the project's model through the `lmms_eval.models` entry point
(pyproject: dvlm_exp = dvlm_exp.evaluation.lmms_plugin:manifests) on a project task from --include_path.

The generation preset follows the task given to --tasks (conf/task/<preset>.yaml whose lmms_task
it is), and lmms-eval's own results JSON / samples carry the record, through lmms-eval 0.7.3's
channels for model metrics: `gen_metrics.log_metrics` (results["throughput"], averaged per sample
by `summarize_logged_metrics`) and `GenerationResult.token_counts` (samples' token_counts,
results["efficiency"], `efficiency_metrics.build_efficiency_summary`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def lmms_eval(tmp_path, model_args: list[str], tasks: str, limit: int = 1):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "dvlm_exp", "--model_args", ",".join(model_args),
         "--tasks", tasks, "--include_path", str(REPO / "dvlm_exp" / "tasks"), "--limit", str(limit),
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)


def outputs(tmp_path, task: str):
    results = list((tmp_path / "out").rglob("*_results.json"))
    assert len(results) == 1, list((tmp_path / "out").rglob("*"))
    samples = list((tmp_path / "out").rglob(f"*samples_{task}*.jsonl"))
    assert len(samples) == 1
    return json.loads(results[0].read_text()), [json.loads(ln) for ln in samples[0].read_text().splitlines()]


def test_python_m_lmms_eval_on_synth_docvqa(tmp_path):
    """model_args name the task's own preset (task=synth_docvqa) and override its gen settings."""
    args = ["model=tiny", "task=synth_docvqa", "task.synthetic.n=2", "task.gen.gen_length=8", "task.gen.block_length=8",
            "task.gen.steps=4", "progress=false"]
    p = lmms_eval(tmp_path, args, "synth_docvqa")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    res, rows = outputs(tmp_path, "synth_docvqa")
    assert "anls,none" in res["results"]["synth_docvqa"]
    assert res["n-samples"]["synth_docvqa"]["effective"] == 1
    (row,) = rows
    assert isinstance(row["filtered_resps"][0], str) and row["doc_id"] == 0
    # the generated dataset the placeholder path was replaced with (task.synthetic.n=2 from model_args)
    assert "synth_docvqa-n2-s0" in json.dumps(res["configs"]["synth_docvqa"]["dataset_path"])
    t = res["throughput"]  # the model_args overrides of the preset were used: 8 answer slots, 4 steps
    assert (t["avg_gen_length"], t["avg_block_length"], t["avg_steps"], t["avg_nfe"]) == (8, 8, 4, 4)


def test_preset_follows_tasks_and_record_reaches_lmms_output(tmp_path):
    """No task= in model_args: --tasks synth_docvqa runs synth_docvqa's preset (32/32/16, not the
    default task's 4/4/4), and lmms-eval's results JSON / samples carry FLOPs, reduction, kept
    tokens, timing and the preset."""
    p = lmms_eval(tmp_path, ["model=tiny", "prune=fastv", "ratio=0.35", "task.synthetic.n=2", "progress=false"],
                  "synth_docvqa")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    res, (row,) = outputs(tmp_path, "synth_docvqa")
    t = res["throughput"]
    # the preset (conf/task/synth_docvqa.yaml) and the sampler really ran it: one forward per step
    assert (t["avg_gen_length"], t["avg_block_length"], t["avg_steps"], t["avg_temperature"]) == (32, 32, 16, 0.0)
    assert t["avg_nfe"] == 16
    assert t["avg_preset=synth_docvqa"] == 1.0
    # FastV at ratio 0.35 keeps round(0.35 * n) visual tokens after its layer (fastv.yaml layer 2 of 4)
    assert t["avg_visual_tokens"] > 0 and t["avg_visual_kept"] == round(0.35 * t["avg_visual_tokens"])
    assert t["avg_visual_kept"] < t["avg_visual_layer_avg"] < t["avg_visual_tokens"]
    assert 0 < t["avg_flops"] < t["avg_flops_baseline"]
    assert t["avg_flops_reduction"] == pytest.approx(1 - t["avg_flops"] / t["avg_flops_baseline"])
    assert 0.3 < t["avg_flops_reduction"] < 0.9
    assert t["avg_latency_s"] > 0 and t["total_elapsed_time"] == pytest.approx(t["avg_latency_s"])
    # per-sample token counts: the answer's tokens (at most gen_length) and the whole prompt
    (tc,) = row["token_counts"]
    assert 0 < tc["output_tokens"] <= 32 and tc["output_tokens"] == t["total_gen_tokens"]
    assert tc["input_tokens"] > t["avg_visual_tokens"]
    eff = res["efficiency"]["overall"]
    assert eff["total_output_tokens"] == tc["output_tokens"] and eff["total_input_tokens"] == tc["input_tokens"]


@pytest.mark.parametrize("model_args, tasks, message", [
    (["task=synth_shapes"], "synth_docvqa",
     "error: model_args task=synth_shapes is the generation preset of lmms-eval task 'synth_shapes', but --tasks "
     "evaluates 'synth_docvqa', whose preset is task=synth_docvqa"),
    ([], "synth_docvqa,synth_shapes",
     "error: --tasks synth_docvqa,synth_shapes need different generation presets (synth_docvqa: task=synth_docvqa "
     "block_length=32 gen_length=32 steps=16 think=no_think; synth_shapes: task=synth_shapes block_length=4 "
     "gen_length=4 steps=4 think=None): run one lmms_eval per preset"),
])
def test_preset_conflicts_are_refused_before_weights_load(tmp_path, model_args, tasks, message):
    p = lmms_eval(tmp_path, ["model=tiny", "task.synthetic.n=2", "progress=false", *model_args], tasks)
    assert p.returncode == 2, (p.stdout + p.stderr)[-4000:]
    assert message in p.stderr, p.stderr[-4000:]
    assert "Traceback" not in p.stderr
    assert not list((tmp_path / "out").rglob("*_results.json"))


def test_every_preset_task_composes_to_its_own_preset():
    """lmms_task_presets maps each lmms-eval task to the conf/task preset that runs it (docvqa_val's
    two prompts included); task_config composes it with the model_args applied after the preset."""
    from dvlm_exp.evaluation.lmms_plugin import PresetError, lmms_task_presets, task_config

    presets = lmms_task_presets()
    assert presets["docvqa_val_llada_v"] == ("docvqa_val", ["task.prompt=llada_v"])
    for lmms_task, (preset, _) in presets.items():
        cfg = task_config(lmms_task, ["model=tiny", "task.gen.steps=2"])
        assert (cfg.task.lmms_task, cfg.task.name, cfg.task.gen.steps) == (lmms_task, preset, 2)
    with pytest.raises(PresetError, match=r"'mmmu_val' has no generation preset .*,task=mme "):
        task_config("mmmu_val", ["model=tiny"])
    assert task_config("mmmu_val", ["model=tiny", "task=mme"]).task.gen.gen_length == 2  # named: its settings
