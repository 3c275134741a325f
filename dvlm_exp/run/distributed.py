"""Data-parallel evaluation: one job on several processes (GPUs, nodes), one record.

Sharding is lmms-eval's own: `lmms_eval.evaluator.evaluate` reads RANK / WORLD_SIZE from the
environment, gives each rank every WORLD_SIZE-th document (`lmms_eval.utils.create_iterator`),
pads the shorter shards with copies of their last request (`_clone_padding_request`, metadata
`__padding_only__`), and gathers the logged samples and per-sample metrics to rank 0
(`torch.distributed.gather_object`), which alone aggregates the metrics. The launchers only set
the environment:

- `torchrun --nproc_per_node=N run.py ... hydra.run.dir=<dir>` and, on GPUs, `accelerate launch
  --multi_gpu --num_processes=N run.py ...` (accelerate's multi_gpu_launcher runs torchrun): both
  export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
- SLURM through hydra-submitit (`hydra.launcher.tasks_per_node=N hydra.launcher.nodes=M`): every
  task runs the Hydra job; `launch_env` exports the same variables from the submitit task
  (`submitit.helpers.TorchDistributedEnvironment`).

This module starts the process group (gloo on CPU, NCCL on CUDA; each rank on GPU LOCAL_RANK),
skips lmms-eval's padding requests without generating (their responses are dropped by lmms-eval;
our generation has no collectives, so ranks need not run equally many forwards), and gathers
what lmms-eval does not: the predictions and the per-sample `SampleRecord`s (FLOPs, tokens,
latencies) plus per-rank wall time and peak memory. Rank 0 alone writes results.json,
predictions.jsonl and the W&B run; the other ranks write nothing but their journal entries
(`resume.SampleJournal`: one file per sample, so ranks share the run dir's journal without
conflict, and a requeued job resumes even with another number of ranks).

A rank that raises exits non-zero; torchrun then stops the other ranks, and under SLURM srun
does (`SLURM_KILL_BAD_EXIT=1`, conf/hydra/launcher/slurm.yaml): rank 0 never reaches the
gather, so no results.json is written.
"""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

# the timeout lmms-eval sets for its own collectives (lmms_eval/evaluator.py, default_pg_timeout):
# fast ranks wait at the gather for the slowest one
TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def world() -> Dist:
    """This process's place from the launcher's environment (no process group needed)."""
    env = os.environ
    return Dist(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                local_rank=int(env.get("LOCAL_RANK", 0)))


def launch_env() -> None:
    """In a submitit task of a multi-task job: export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT (submitit's helper; the port derives from the job id, the same in every task)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # GPUs: setup() picks LOCAL_RANK among the visible ones (works with gpus_per_node and gpus_per_task)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def rank_file(name: str) -> str:
    """This rank's name for a per-process file of the run dir: `name` on rank 0, e.g.
    `failed.rank1.json` / `.dvlm_lock.rank1` on rank 1. Each rank holds its own run-dir lock (a
    second job into the same dir is refused by every rank) and writes its own failure record (the
    rank that died keeps its error; the others' say they lost a peer)."""
    d = world()
    if d.rank == 0:
        return name
    head, _, ext = name.rpartition(".")
    return f"{head}.rank{d.rank}.{ext}" if head else f"{name}.rank{d.rank}"


def info() -> dict:
    """rank and world size for failure records (empty in a one-process job)."""
    d = world()
    return {"rank": d.rank, "world_size": d.world_size} if d.active else {}


def check_run_dir(hydra_overrides) -> str | None:
    """The error for a multi-process single run whose run dir is Hydra's default (`${now:...}`, which
    each rank resolves by itself and may resolve differently), else None."""
    if world().active and not any(str(o).startswith("hydra.run.dir=") for o in hydra_overrides or ()):
        return ("this run has several processes (WORLD_SIZE={}): pass hydra.run.dir=<dir> so that every "
                "rank writes into the same run dir".format(world().world_size))
    return None


def check(cfg) -> None:
    """Settings a multi-process run does not support (a ConfigError, before any weight loads)."""
    from dvlm_exp.errors import ConfigError

    d = world()
    if d.active and cfg.get("loyalty"):
        raise ConfigError(f"loyalty=true is not supported with several processes (WORLD_SIZE={d.world_size}): "
                          "run the loyalty job in one process, or drop loyalty=true")


def setup(cfg, run_dir) -> Dist:
    """Start (or reuse) the default process group of a multi-process job; every rank must be in the
    same run dir. One process: Dist() and nothing else."""
    d = world()
    if not d.active:
        return d
    import torch
    import torch.distributed as dist

    cuda = str(cfg.model.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_destroy)
    d = Dist(d.rank, d.world_size, d.local_rank, dist.get_backend())
    dirs = [None] * d.world_size
    dist.all_gather_object(dirs, os.path.realpath(run_dir))
    if len(set(dirs)) > 1:
        from dvlm_exp.errors import ConfigError

        raise ConfigError(f"the ranks of this job run in different run dirs ({', '.join(sorted(set(dirs)))}): "
                          "pass hydra.run.dir=<dir> (or hydra.sweep.dir=<dir>)")
    return d


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def evaluate_kwargs() -> dict:
    """simple_evaluate's arguments for this process: lmms-eval's torchrun path (plain
    torch.distributed collectives on the group started by `setup`) when there are several ranks."""
    return {"distributed_executor_backend": "torchrun"} if world().active else {}


def collective_device() -> str:
    """Where lmms-eval's tensors for collectives live (its torchrun path uses `lm.device`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def is_padding(request) -> bool:
    """lmms-eval's filler request for a shorter shard (its response is discarded)."""
    return bool((getattr(request, "metadata", None) or {}).get("__padding_only__"))


def gather(d: Dist, generator, predictions: list[dict], stats: dict):
    """All ranks' predictions and SampleRecords to rank 0, in document order (the order of a
    one-process run), plus one stats dict per rank. Rank 0: (predictions, per_rank) with
    `generator.recorder.samples` replaced by every rank's records; other ranks: None."""
    import torch.distributed as dist

    samples = generator.recorder.samples
    if len(samples) != len(predictions):
        raise RuntimeError(f"rank {d.rank}: {len(samples)} sample records for {len(predictions)} predictions")
    mine = {"rank": d.rank, "host": socket.gethostname(), "n_samples": len(predictions), **stats,
            "pairs": list(zip(predictions, samples))}
    everything = [None] * d.world_size if d.main else None
    dist.gather_object(mine, everything, dst=0)
    if not d.main:
        return None
    pairs = sorted((p for r in everything for p in r.pop("pairs")), key=lambda ps: ps[0]["doc_id"])
    generator.recorder.samples = [s for _, s in pairs]
    return [p for p, _ in pairs], everything


def annotate(record: dict, d: Dist, per_rank: list[dict]) -> None:
    """Per-rank timings and peak memory in rank 0's record (the record's `wall_s` is rank 0's,
    which ends after every rank's shard); peak memory is the largest of the ranks; judge calls are
    every rank's (each rank's lmms-eval scores its own samples)."""
    record["timing"]["world_size"] = d.world_size
    record["timing"]["backend"] = d.backend
    record["timing"]["ranks"] = [{k: v for k, v in r.items() if k not in ("peak_bytes", "judge_calls")}
                                 for r in per_rank]
    judge = record.get("judge")
    if judge and "n_requests" in judge:
        calls = [r["judge_calls"] or [0, 0] for r in per_rank]
        judge["n_requests"], judge["n_failed"] = sum(c[0] for c in calls), sum(c[1] for c in calls)
    record["memory"]["peak_bytes"] = max(r["peak_bytes"] for r in per_rank)
    record["memory"]["peak_bytes_per_rank"] = [r["peak_bytes"] for r in per_rank]
