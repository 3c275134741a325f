"""Entry point for lmms-eval's model registry (group `lmms_eval.models` in pyproject.toml).

    python -m lmms_eval --model dvlm_exp --model_args model=tiny,prune=fastv,ratio=0.35 \
        --tasks synth_docvqa --include_path dvlm_exp/tasks --limit 2

model_args are Hydra overrides of run.py's config (`task=...` picks the generation preset and,
for video tasks, `task.video.max_frames`). The project's synthetic tasks carry a placeholder
`dataset_path` in their YAML (the runner passes the generated folder in a dict task entry); on
this CLI path `fill_synthetic_tasks` makes lmms-eval's TaskManager substitute the generated
dataset ($DVLM_CACHE/data, written on first use) for the placeholder.
"""

from __future__ import annotations

PLACEHOLDER = "OVERRIDE_ME"


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="dvlm_exp", simple_class_path="dvlm_exp.evaluation.lmms_adapter.DvlmLMM")]


def synthetic_dataset_path(name: str, cfg=None) -> str | None:
    """The generated dataset folder of project task `name` (ensured), from `cfg` when it runs that
    task, else from the preset conf/task/<name>.yaml; None when `name` is not a synthetic preset."""
    from dvlm_exp.run.build import CONF_DIR, compose_config, task_entry

    if cfg is None or cfg.task.get("lmms_task") != name or cfg.task.get("synthetic") is None:
        if not (CONF_DIR / "task" / f"{name}.yaml").is_file():
            return None
        cfg = compose_config([f"task={name}"])
        if cfg.task.get("synthetic") is None or cfg.task.get("lmms_task") != name:
            return None
    return task_entry(cfg)["dataset_path"]


def fill_synthetic_tasks(cfg=None) -> None:
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
            real = synthetic_dataset_path(name, cfg)
            if real is not None:
                config = {**config, "dataset_path": real}
        return config

    _get_config._dvlm_original = original
    TaskManager._get_config = _get_config
