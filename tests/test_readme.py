"""Docs check (issue 18 item 11): every shell command in README.md's ```bash blocks is listed here and
is run, checked or refused as the README says, from a temporary working directory in a subprocess.

- RUN: run as written from a temporary cwd (`limit=1 progress=false` appended to run.py commands, so
  the sandbox answers in seconds); exit 0, the summary printed, nothing written into the cwd.
- CHECK: too long to run here (whole splits, the random tiny model, a judge, SLURM), so the command
  line goes through exactly what run.py does before Hydra runs (`run.check_command_line`: syntax,
  options, keys, then every job's values, ranges and checkpoint) from a temporary cwd: it must pass.
- REFUSED: needs a checkpoint this machine does not have (/data/LLaDA-V): it must be refused with exit
  code 2, one `error:` line and the download hint for that model, before anything loads.
- NOT_RUN: not a run.py command line we can check (the installer, the whole suite, long benchmarks,
  root-only cluster scripts, placeholders), each with its reason and the test that covers it.

A command added to the README without an entry here fails `test_every_readme_command_is_listed`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RUN = [
    "python run.py",
    "python run.py prune=fastv prune.query_set=masked_response schedule=at_step schedule.step=2",
    "python run.py prune=divprune schedule=start_frac schedule.frac=0.5 ratio=0.25",
    "python run.py -m prune=none,fastv ratio=0.25,0.5",
    "python run.py prune=fastv ratio=0.25 loyalty=true",
    "python scripts/sweep_jobs.py",
]
CHECK = [
    "python run.py model=tiny prune=fastv prune.layer=2 ratio=0.35",
    "python run.py logger=wandb",
    "python run.py limit=null",
    "python run.py prune=sandbox_fastv ratio=0.1 limit=null",
    "python run.py -m +sweep=sandbox limit=null",
    "python run.py task=synth_video_caption judge=openai judge.base_url=http://127.0.0.1:8000/v1 judge.model=Qwen2.5-7B-Instruct",
    "python run.py task=synth_video_caption",
    "python run.py -m hydra/launcher=local prune=none,fastv limit=2",
    "python run.py -m hydra/launcher=slurm_dev prune=none,fastv,random ratio=0.5 limit=1",
    "python run.py -m hydra/launcher=slurm_dev hydra.launcher.tasks_per_node=2 hydra.launcher.mem_gb=4 limit=null",
    "python scripts/analyze.py limit=1 prune=fastv prune.layer=2",  # analyze.py takes run.py's overrides
]
REFUSED = {  # command -> the model whose download the error must name
    "python run.py model=llada_v model.path=/data/LLaDA-V prune=fastv prune.layer=20 ratio=0.35": "GSAI-ML/LLaDA-V",
    "python run.py model=llada_v model.path=/data/LLaDA-V prune=redvtp ratio=0.5 task=docvqa_val": "GSAI-ML/LLaDA-V",
    "python run.py -m +sweep=study_table1 model.path=/data/LLaDA-V model.text_tower_path=/data/siglip-so400m-patch14-384 hydra/launcher=slurm":
        "GSAI-ML/LLaDA-V",
    "python scripts/analyze.py model=llada_v model.path=/data/LLaDA-V task=docvqa_val limit=4 prune=fastv prune.layer=20":
        "GSAI-ML/LLaDA-V",
}
NOT_RUN = {
    "make install": "the installer itself (tests/test_environment.py checks the installed versions)",
    "make test": "the whole suite",
    "python scripts/plan_flops.py model=llada_v model.path=/data/LLaDA-V task=docvqa_val prune=fastv "
    "--ratios 1,0.75,0.5,0.35,0.25 --layers 2,8,16,20,24 --image 1700x2200": "needs LLaDA-V's config.json (tests/test_plan.py runs it on model=tiny)",
    "python scripts/judge.py outputs/runs/<date>/<time> judge.base_url=http://127.0.0.1:8000/v1 judge.model=...":
        "placeholders (tests/test_judge.py)",
    "python scripts/bench.py --hidden 512 --heads 8 --inter 1376 --layers 16 --n-visual 2000 --reps 3 --warmup 1":
        "~25 min (tests/test_bench.py runs a small one)",
    "python scripts/bench.py --hidden 1024 --heads 8 --inter 2752 --layers 16 --n-visual 2000 --reps 2 --warmup 1 "
    "--no-peers --no-memory": "~22 min (tests/test_bench.py)",
    "python scripts/bench.py --hidden 512 --heads 8 --layers 16 --n-visual 2000 --reps 1 --warmup 1 --no-peers "
    "--methods fastv --query-sets last_token --keeps 0.25 --profile": "~6 min (tests/test_bench.py)",
    "python scripts/report.py outputs/sweeps/sandbox": "needs the sandbox sweep's runs (tests/test_report.py)",
    "python scripts/train_tiny.py": "11 min (tests/test_sandbox.py)",
    "python scripts/report.py outputs/sweeps": "needs sweep runs (tests/test_report.py)",
    "python run.py -m hydra/launcher=slurm prune=none,fastv ratio=0.25,0.5 task=docvqa_val ...": "a placeholder (...)",
    "scripts/slurm/up.sh": "root + apt-get (tests/test_slurm.py)",
    "torchrun --nproc_per_node=8 run.py model=llada_v task=docvqa_val limit=null prune=fastv ratio=0.25 "
    "hydra.run.dir=outputs/runs/docvqa_fastv_dp8": "8 GPUs and LLaDA-V (tests/test_distributed.py runs 2 CPU ranks)",
    "python run.py -m hydra/launcher=slurm hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=8 "
    "hydra.launcher.gpus_per_node=8 hydra.launcher.mem_gb=400 model=llada_v task=docvqa_val limit=null prune=none,fastv":
        "two GPU nodes (tests/test_slurm.py runs a 2-task job on the dev cluster)",
    "python -m torch.distributed.run --standalone --nproc_per_node=2 run.py limit=null hydra.run.dir=outputs/runs/dp2":
        "200 samples x 2 ranks, the README's measurement (tests/test_distributed.py runs it at limit=3)",
    "scripts/slurm/down.sh": "tests/test_slurm.py",
}


def readme_commands() -> list[str]:
    """The commands of README.md's ```bash blocks: continuation lines joined, `# comments` dropped,
    `a && b` split into two commands."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            out += [" ".join(part.split()) for part in line.split("&&")]
    return out


def test_every_readme_command_is_listed():
    cmds = readme_commands()
    listed = set(RUN) | set(CHECK) | set(REFUSED) | set(NOT_RUN)
    assert [c for c in cmds if c not in listed] == [], "README commands missing from tests/test_readme.py"
    assert sorted(listed - set(cmds)) == [], "listed here but no longer in the README"


def _argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    assert words[0] == "python"
    return [sys.executable, str(REPO / words[1]), *words[2:]]


def _env(tmp_path) -> dict:
    env = {**os.environ, "DVLM_OUTPUTS": str(tmp_path / "out")}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.mark.parametrize("cmd", RUN)
def test_readme_command_runs(cmd, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    argv = _argv(cmd) + (["limit=1", "progress=false"] if cmd.startswith("python run.py") else [])
    r = subprocess.run(argv, cwd=cwd, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (cmd, r.stderr[-3000:])
    if cmd.startswith("python run.py"):
        n = 4 if " -m " in cmd else 1
        assert r.stdout.count("dvlm_exp | model=sandbox") == n, r.stdout[-3000:]
        assert len(list((tmp_path / "out").rglob("results.json"))) == n
    else:
        assert "smoke_tiny" in r.stdout and '"total_jobs"' in r.stdout.splitlines()[-1]
    assert list(cwd.iterdir()) == []


_CHECK_CODE = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('run_py', sys.argv[1]); "
               "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
               "m.check_command_line(sys.argv[2:]); print('checked')")


def _check(cmd: str, tmp_path) -> subprocess.CompletedProcess:
    words = shlex.split(cmd)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", _CHECK_CODE, str(REPO / "run.py"), *words[2:]], cwd=cwd,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", CHECK)
def test_readme_command_passes_run_checks(cmd, tmp_path):
    r = _check(cmd, tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("checked"), (cmd, r.stderr[-2000:])
    assert not (tmp_path / "out").exists() and list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.parametrize("cmd", sorted(REFUSED))
def test_readme_command_without_checkpoint_is_refused(cmd, tmp_path):
    r = _check(cmd, tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: "), (cmd, r.stderr[-2000:])
    assert f"hf download {REFUSED[cmd]}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
