"""Config checks that run before any weight loads and import no torch.

Each failure is one line naming the key and the valid range, raised as `ConfigError`;
run.py prints it and exits non-zero.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from dvlm_exp.registry import MODEL_FAMILIES, PRUNERS, SCHEDULES, UnknownNameError


class ConfigError(ValueError):
    pass


def model_depth(cfg: DictConfig) -> int:
    """Decoder layers of the configured model, from the tiny spec or the checkpoint's config.json."""
    from dvlm_exp.models.checkpoint import CheckpointError, read_config

    m = cfg.model
    if m.get("tiny") is not None:
        return int(m.tiny.num_hidden_layers)
    if OmegaConf.is_missing(m, "path") or m.get("path") in (None, ""):
        raise ConfigError(f"model={m.name} needs model.path=/path/to/checkpoint (a local copy of the released weights)")
    try:
        return int(read_config(m.path, m.get("model_type", "llava_llada"))["num_hidden_layers"])
    except CheckpointError as e:
        raise ConfigError(str(e)) from e


def check_task(cfg: DictConfig) -> None:
    """The task block: prompt variant (task.prompt / task.lmms_tasks) and think mode."""
    t = cfg.task
    variants = t.get("lmms_tasks")
    if variants is not None and t.get("prompt") not in variants:
        raise ConfigError(f"task.prompt={t.get('prompt')} must be one of {', '.join(variants)} for task={t.name}")
    think = t.gen.get("think")
    if think not in (None, "no_think", "think"):
        raise ConfigError(f"task.gen.think={think} must be null, no_think or think")


def check_task_data(cfg: DictConfig) -> None:
    """Can lmms-eval load the task's data? (dvlm_exp.task_data; fails fast instead of 5 hidden retries)."""
    from dvlm_exp.task_data import TaskDataError
    from dvlm_exp.task_data import check_task_data as _check

    try:
        _check(cfg)
    except TaskDataError as e:
        raise ConfigError(str(e)) from e


def check(cfg: DictConfig, data: bool = True) -> None:
    """All checks before weights load; `data=False` skips `check_task_data` (the dataset's reachability)."""
    try:
        PRUNERS.check(cfg.prune.name)
        MODEL_FAMILIES.check(cfg.model.family)
        SCHEDULES.check(cfg.schedule.name)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from e

    ratio = cfg.ratio
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (0.0 < float(ratio) <= 1.0):
        raise ConfigError(f"ratio={ratio} is outside (0, 1]: ratio is the fraction of visual tokens kept (e.g. ratio=0.35)")

    check_task(cfg)
    g = cfg.task.gen
    for key in ("gen_length", "block_length", "steps"):
        if not isinstance(g[key], int) or g[key] <= 0:
            raise ConfigError(f"task.gen.{key}={g[key]} must be a positive integer")
    if g.gen_length % g.block_length:
        raise ConfigError(f"task.gen.gen_length={g.gen_length} must be divisible by task.gen.block_length={g.block_length}")
    blocks = g.gen_length // g.block_length
    if g.steps % blocks:
        raise ConfigError(f"task.gen.steps={g.steps} must be divisible by the number of blocks ({blocks} = gen_length/block_length)")
    if g.remasking not in ("low_confidence", "random"):
        raise ConfigError(f"task.gen.remasking={g.remasking} must be low_confidence or random")

    if cfg.schedule.name == "at_step":
        if OmegaConf.is_missing(cfg.schedule, "step"):
            raise ConfigError(f"schedule=at_step needs schedule.step=<s> with 0 <= s < task.gen.steps={g.steps}")
        s = cfg.schedule.step
        if not isinstance(s, int) or not (0 <= s < g.steps):
            raise ConfigError(f"schedule.step={s} is outside [0, {g.steps - 1}]: the run has task.gen.steps={g.steps} denoising steps")

    if cfg.prune.get("position_ids", "keep") not in ("keep", "renumber"):
        raise ConfigError(f"prune.position_ids={cfg.prune.position_ids} must be keep or renumber")
    if cfg.prune.name != "none":
        depth = model_depth(cfg)
        layer = cfg.prune.layer
        lo = 1 if cfg.prune.name == "fastv" else 0
        if not isinstance(layer, int) or not (lo <= layer <= depth - 1):
            raise ConfigError(
                f"prune.layer={layer} is outside [{lo}, {depth - 1}] for model={cfg.model.name} ({depth} decoder layers)"
            )
        if cfg.prune.name == "fastv":
            qs = cfg.prune.get("query_set")
            from dvlm_exp.pruning.fastv_queries import QUERY_SETS

            if qs not in QUERY_SETS:
                raise ConfigError(f"prune.query_set={qs} must be one of {', '.join(QUERY_SETS)}")
    elif cfg.model.get("tiny") is None:
        model_depth(cfg)  # checks model.path before anything loads

    if cfg.limit is not None and (not isinstance(cfg.limit, int) or cfg.limit <= 0):
        raise ConfigError(f"limit={cfg.limit} must be a positive integer or null (all samples)")

    if data:
        check_task_data(cfg)
