"""lmms-eval's own CLI runs the project's model through the `lmms_eval.models` entry point
(pyproject: dvlm_exp = dvlm_exp.evaluation.lmms_plugin:manifests) on a project task from --include_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_python_m_lmms_eval_on_synth_docvqa(tmp_path):
    args = ",".join(["model=tiny", "task=synth_docvqa", "task.synthetic.n=2", "task.gen.gen_length=8", "task.gen.block_length=8",
                     "task.gen.steps=4", "progress=false"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "dvlm_exp", "--model_args", args, "--tasks", "synth_docvqa",
         "--include_path", str(REPO / "dvlm_exp" / "tasks"), "--limit", "1", "--output_path", str(tmp_path / "out"),
         "--log_samples"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    results = [f for f in (tmp_path / "out").rglob("*_results.json")]
    assert len(results) == 1, list((tmp_path / "out").rglob("*"))
    res = json.loads(results[0].read_text())
    assert "anls,none" in res["results"]["synth_docvqa"]
    assert res["n-samples"]["synth_docvqa"]["effective"] == 1
    samples = [f for f in (tmp_path / "out").rglob("*samples_synth_docvqa*.jsonl")]
    assert len(samples) == 1
    (row,) = [json.loads(ln) for ln in samples[0].read_text().splitlines()]
    assert isinstance(row["filtered_resps"][0], str) and row["doc_id"] == 0
    # the generated dataset the placeholder path was replaced with (task.synthetic.n=2 from model_args)
    assert "synth_docvqa-n2-s0" in json.dumps(res["configs"]["synth_docvqa"]["dataset_path"])
