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
        from dvlm_exp.paths import resolve_path

        c = read_config(resolve_path(m.path), m.get("model_type", "llava_llada"))
        if "num_hidden_layers" not in c and isinstance(c.get("text_config"), dict):  # llava-hf: nested text config
            from dvlm_exp.models.llava_layout import text_num_layers

            return text_num_layers(c)
        return int(c["num_hidden_layers"] if "num_hidden_layers" in c else c["n_layers"])  # n_layers: OLMo-named LLaDA (LaViDa)
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
    if g.get("head_rows", "all") not in ("all", "needed"):
        raise ConfigError(f"task.gen.head_rows={g.head_rows} must be all or needed")

    if cfg.schedule.name == "at_step":
        if OmegaConf.is_missing(cfg.schedule, "step"):
            raise ConfigError(f"schedule=at_step needs schedule.step=<s> with 0 <= s < task.gen.steps={g.steps}")
        s = cfg.schedule.step
        if not isinstance(s, int) or not (0 <= s < g.steps):
            raise ConfigError(f"schedule.step={s} is outside [0, {g.steps - 1}]: the run has task.gen.steps={g.steps} denoising steps")

    _check_schedule(cfg, g)
    if cfg.model.get("prefix_cache", False) is not False:  # LaViDa Prefix-DLM: step-0 methods only
        from dvlm_exp.engine.prefix import check_config as check_prefix_cache

        check_prefix_cache(cfg)
    if cfg.model.get("tiny") is None:
        model_depth(cfg)  # checks model.path before anything loads
    _check_prune(cfg)

    if cfg.limit is not None and (not isinstance(cfg.limit, int) or cfg.limit <= 0):
        raise ConfigError(f"limit={cfg.limit} must be a positive integer or null (all samples)")

    if data:
        check_task_data(cfg)


def _check_schedule(cfg: DictConfig, g) -> None:
    sc = cfg.schedule
    persist = sc.get("persist")
    if persist is not None and persist not in ("state", "replay", "none"):
        raise ConfigError(f"schedule.persist={persist} must be state, replay or none")
    for key in ("frac",):
        if key in sc and not (isinstance(sc[key], (int, float)) and 0.0 <= float(sc[key]) < 1.0):
            raise ConfigError(f"schedule.{key}={sc[key]} must be a fraction in [0, 1) of task.gen.steps={g.steps}")
    if "fracs" in sc:
        fr = list(sc.fracs)
        if not fr or any(not isinstance(f, (int, float)) or not 0.0 <= f < 1.0 for f in fr) or fr != sorted(set(fr)):
            raise ConfigError(f"schedule.fracs={fr} must be increasing fractions in [0, 1)")
    if "threshold" in sc and not (isinstance(sc.threshold, (int, float)) and 0.0 < float(sc.threshold) <= 1.0):
        raise ConfigError(f"schedule.threshold={sc.threshold} must be in (0, 1]: a mean answer-token probability")
    if "start" in sc and not (isinstance(sc.start, int) and 0 <= sc.start < g.steps):
        raise ConfigError(f"schedule.start={sc.start} is outside [0, {g.steps - 1}]")


def _check_prune(cfg: DictConfig) -> None:
    from dvlm_exp.pruning.specs import COMMON_CHOICES, SPECS

    p = cfg.prune
    spec = SPECS.get(p.name, {"layers": {}, "choices": {}})
    for key, allowed in {**COMMON_CHOICES, **spec["choices"]}.items():
        if key in p and p[key] not in allowed:
            raise ConfigError(f"prune.{key}={p[key]} must be one of {', '.join(map(str, allowed))}")
    if p.name == "sparsevlm":  # v1 renumbers (truncated ids), v2 keeps the original ids (methods.md §0.4)
        want = {"v1": "renumber", "v2": "keep"}.get(p.get("version"))
        if want and p.get("position_ids") != want:
            raise ConfigError(f"prune.version={p.version} uses position_ids={want}: add prune.position_ids={want}")
    if not spec["layers"]:
        return
    depth = model_depth(cfg)
    for key, lo in spec["layers"].items():
        if key not in p:
            continue
        val = p[key]
        vals = list(val) if OmegaConf.is_list(val) or isinstance(val, (list, tuple)) else [val]
        for v in vals:
            if not isinstance(v, int) or isinstance(v, bool) or not (lo <= v <= depth - 1):
                raise ConfigError(
                    f"prune.{key}={val} is outside [{lo}, {depth - 1}] for model={cfg.model.name} ({depth} decoder layers)"
                )
