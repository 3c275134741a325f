"""Data-parallel evaluation (dvlm_exp/run/distributed.py) on CPU: torchrun with the gloo backend.

Two ranks must give the record of one process on the same samples (predictions, metrics, FLOPs,
tokens: everything but timings and memory); rank 0 alone writes; lmms-eval's padding request of
the shorter shard (limit=3 on 2 ranks: lmms_eval.evaluator.evaluate, `_clone_padding_request`)
is not generated; a rank that dies fails the job with no record, and the same command then
resumes from the ranks' journal to the uninterrupted record. The sandbox model, 3 samples: each
torchrun start imports lmms-eval in both ranks (~30 s on 2 loaded cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

ARGS = ["prune=fastv", "ratio=0.5", "limit=3", "progress=false"]
HOOKS = ("DVLM_FAIL_AFTER_SAMPLES", "DVLM_FAIL_ONLY", "DVLM_FAIL_RANK", "DVLM_SAMPLE_SLEEP_S",
         "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in HOOKS}
    return dict(env, PYTHONUNBUFFERED="1", **extra)


def run_one(run_dir, **env):
    return subprocess.run([sys.executable, "run.py", *ARGS, f"hydra.run.dir={run_dir}"], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def run_two(*args, **env):
    # torchrun itself (python -m torch.distributed.run): the venv's `torchrun` script may name another python
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def stable(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k not in ("timing", "memory", "wandb")}
    out["config"] = {k: v for k, v in rec["config"].items() if k != "logger"}
    return out


def predictions(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("latency_s")
    return rows


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    d = tmp_path_factory.mktemp("one") / "run"
    p = run_one(d)
    assert p.returncode == 0, p.stderr[-3000:]
    return d


def test_two_ranks_equal_one_process(one_process, tmp_path):
    from dvlm_exp.run.record import is_complete, read_results

    d = tmp_path / "run"
    p = run_two(*ARGS, "logger=wandb", "logger.mode=offline", f"hydra.run.dir={d}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert is_complete(d)
    ref, rec = read_results(one_process), read_results(d)
    assert rec["n_samples"] == 3 and rec["flops"]["total"] == ref["flops"]["total"] > 0
    assert rec["flops"]["reduction"] == ref["flops"]["reduction"] > 0  # fastv pruned, summed over both ranks
    assert stable(rec) == stable(ref)
    assert predictions(d) == predictions(one_process)
    # lmms-eval's shards: rank 0 docs 0, 2; rank 1 doc 1 (+ a padding copy, not generated)
    t = rec["timing"]
    assert t["world_size"] == 2 and t["backend"] == "gloo"
    assert [(r["rank"], r["n_samples"], r["generated"]) for r in t["ranks"]] == [(0, 2, 2), (1, 1, 1)]
    assert rec["memory"]["peak_bytes"] == max(rec["memory"]["peak_bytes_per_rank"]) > 0
    assert t["wall_s"] > 0 and all(r["wall_s"] > 0 for r in t["ranks"])
    # one record and one W&B run, written by rank 0: one summary, no per-rank files but the ranks' locks
    assert p.stdout.count("dvlm_exp | model=sandbox") == 1
    assert sorted(f.name for f in d.iterdir() if not f.name.startswith(".")) == [
        "predictions.jsonl", "results.json", "run.log", "wandb"]
    assert rec["wandb"]["mode"] == "offline" and len(list((d / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_dead_rank_fails_the_job_then_the_same_command_resumes(one_process, tmp_path):
    from dvlm_exp.run.record import is_complete, read_results

    d = tmp_path / "run"
    # rank 0 crashes after its first sample (doc 0 journaled), before doc 2; rank 1 loses its peer
    p = run_two(*ARGS, f"hydra.run.dir={d}", DVLM_FAIL_AFTER_SAMPLES="1", DVLM_FAIL_RANK="0")
    assert p.returncode != 0
    assert "simulated crash" in p.stderr and "ChildFailedError" in p.stderr, p.stderr[-3000:]
    assert not (d / "results.json").exists() and not (d / ".dvlm_complete").exists()
    assert not (d / "predictions.jsonl").exists()
    failed = json.loads((d / "failed.json").read_text())
    assert "simulated crash" in failed["error"] and (failed["job"]["rank"], failed["job"]["world_size"]) == (0, 2)
    journaled = len(list(d.glob("resume_cache/*/*.json")))
    assert journaled >= 1
    # the same command again: the journaled samples come back, the rest is generated
    p = run_two(*ARGS, f"hydra.run.dir={d}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert is_complete(d) and not (d / "resume_cache").exists()
    assert not list(d.glob("failed*.json"))
    rec = read_results(d)
    assert sum(r["replayed"] for r in rec["timing"]["ranks"]) == journaled
    assert sum(r["generated"] for r in rec["timing"]["ranks"]) == 3 - journaled
    assert stable(rec) == stable(read_results(one_process))
    assert predictions(d) == predictions(one_process)


def test_multi_process_run_needs_an_explicit_run_dir(tmp_path):
    """Each rank would resolve Hydra's default run dir (${now:...}) by itself."""
    p = run_two("limit=1", f"hydra.job.name=x{tmp_path.name}")
    assert p.returncode != 0
    assert "error: this run has several processes (WORLD_SIZE=2): pass hydra.run.dir=<dir>" in p.stderr, p.stderr[-2000:]


def test_rank_files_and_unsupported_settings(monkeypatch, tiny_cfg):
    from dvlm_exp.run import distributed
    from dvlm_exp.errors import ConfigError

    for k in HOOKS:
        monkeypatch.delenv(k, raising=False)
    assert distributed.rank_file("failed.json") == "failed.json" and distributed.evaluate_kwargs() == {}
    distributed.check(tiny_cfg.copy())
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.rank_file("failed.json") == "failed.rank3.json"
    assert distributed.rank_file(".dvlm_lock") == ".dvlm_lock.rank3"
    assert distributed.evaluate_kwargs() == {"distributed_executor_backend": "torchrun"}
    cfg = tiny_cfg.copy()
    cfg.loyalty = True
    with pytest.raises(ConfigError, match="loyalty=true is not supported with several processes"):
        distributed.check(cfg)
