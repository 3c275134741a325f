"""Entry point for lmms-eval's model registry (group `lmms_eval.models` in pyproject.toml).

    python -m lmms_eval --model dvlm_exp --model_args model=tiny,prune=fastv,ratio=0.35 \
        --tasks synth_docvqa --include_path dvlm_exp/tasks --limit 2

model_args are Hydra overrides of run.py's config. The generation preset follows the task that
lmms-eval evaluates: `task_config` composes the conf/task/ preset whose `lmms_task` (or one of its
`lmms_tasks`) is that task, then applies the model_args (`task.gen.steps=8` still overrides). A
`task=` in model_args must be the preset of the evaluated task; it is only needed for a task
without a preset of its own (its generation settings are then the named preset's). The project's
synthetic tasks carry a placeholder `dataset_path` in their YAML (the runner passes the generated
folder in a dict task entry); on this CLI path `fill_synthetic_tasks` makes lmms-eval's
TaskManager substitute the generated dataset ($DVLM_CACHE/data, written on first use).
"""

from __future__ import annotations

PLACEHOLDER = "OVERRIDE_ME"


class PresetError(ValueError):
    """The evaluated lmms-eval task(s) and the model_args do not give one generation preset."""


def lmms_task_presets() -> dict[str, tuple[str, list[str]]]:
    """lmms-eval task name -> (conf/task preset, the overrides that select it), read from the
    presets' YAML (`lmms_task`, or `lmms_tasks` keyed by `prompt` as in docvqa_val.yaml)."""
    from omegaconf import OmegaConf

    from dvlm_exp.run.build import CONF_DIR

    out: dict[str, tuple[str, list[str]]] = {}
    for f in sorted((CONF_DIR / "task").glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
        variants = raw.get("lmms_tasks")
        if isinstance(variants, dict):
            for prompt, lmms_task in variants.items():
                out.setdefault(str(lmms_task), (f.stem, [f"task.prompt={prompt}"]))
        elif isinstance(raw.get("lmms_task"), str) and "${" not in raw["lmms_task"]:
            out.setdefault(raw["lmms_task"], (f.stem, []))
    return out


def explicit_preset(overrides: list[str]) -> str | None:
    """The `task=<preset>` given in model_args (the last one wins, as in Hydra), or None."""
    names = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "task"]
    return names[-1] if names else None


def task_config(lmms_task: str, overrides: list[str]):
    """The run config for evaluating `lmms_task` with these model_args: the task's own preset
    (conf/task/, `lmms_task_presets`) with the model_args applied. Raises PresetError, saying what
    to pass, when model_args name another task's preset or the task has no preset and none is named."""
    from dvlm_exp.run.build import compose_config

    presets = lmms_task_presets()
    named = explicit_preset(overrides)
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "task"]
    if named is None:
        if lmms_task not in presets:
            raise PresetError(
                f"lmms-eval task {lmms_task!r} has no generation preset in conf/task/ (those with one: "
                f"{', '.join(sorted(presets))}); name the preset whose generation settings to use in "
                f"model_args, e.g. --model_args ...,task=mme (2/2/2 short answers, conf/task/gen/short.yaml)")
        preset, select = presets[lmms_task]
        return compose_config([f"task={preset}", *select, *rest])
    cfg = compose_config([f"task={named}", *rest])
    if cfg.task.lmms_task != lmms_task and lmms_task in presets:
        own = presets[lmms_task][0]
        raise PresetError(
            f"model_args task={named} is the generation preset of lmms-eval task {cfg.task.lmms_task!r}, but "
            f"--tasks evaluates {lmms_task!r}, whose preset is task={own}: drop task= from model_args (the "
            f"preset follows --tasks) or pass task={own}")
    return cfg


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="dvlm_exp", simple_class_path="dvlm_exp.evaluation.lmms_adapter.DvlmLMM")]


def synthetic_dataset_path(name: str, overrides: list[str] | None = None) -> str | None:
    """The generated dataset folder of lmms-eval task `name` (ensured) under these model_args;
    None when `name` is not a synthetic project task. A preset conflict is the adapter's to report
    (before any weight loads): the data is made from the task's own preset then."""
    from dvlm_exp.run.build import task_entry

    overrides = list(overrides or [])
    try:
        cfg = task_config(name, overrides)
    except PresetError:  # model_args name another task's preset: the data is still the task's own
        try:
            cfg = task_config(name, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "task"])
        except PresetError:
            return None
    if cfg.task.get("synthetic") is None or cfg.task.get("lmms_task") != name:
        return None
    return task_entry(cfg)["dataset_path"]


def fill_synthetic_tasks(overrides: list[str] | None = None) -> None:
    """Patch `TaskManager._get_config` (once per process) so that a task config whose dataset_path is
    the placeholder gets the generated dataset folder instead. Dict task entries that pass their own
    dataset_path (the runner's) still override it."""
    from lmms_eval.tasks import TaskManager

    current = TaskManager._get_config
    original = getattr(current, "_dvlm_original", current)

    def _get_config(self, name):
        config = original(self, name)
        path = config.get("dataset_path") if isinstance(config, dict) else None
        if isinstance(path, str) and path.startswith(PLACEHOLDER):
            real = synthetic_dataset_path(name, overrides)
            if real is not None:
                config = {**config, "dataset_path": real}
        return config

    _get_config._dvlm_original = original
    TaskManager._get_config = _get_config
