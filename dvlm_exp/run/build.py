"""Config -> the objects of a run: compose the config, resolve the model's path, build the model,
method, schedule and generator, and the lmms-eval task entry. Shared by the runner and the
lmms-eval adapter (which receive these, never import each other).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dvlm_exp.run import resume
from dvlm_exp.run.paths import cache_dir
from dvlm_exp.run.validate import check

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Jobs of one process (Hydra's basic launcher) that share a model config reuse the weights.
_MODEL_CACHE: dict = {}


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The same config run.py would see, for tests, the lmms-eval CLI and scripts."""
    from hydra import compose, initialize_config_dir

    overrides = list(overrides or [])
    if not any(o.startswith("hydra.searchpath") for o in overrides):  # sweeps/ from any working directory
        overrides.append(f"hydra.searchpath=[file://{CONF_DIR.parent / 'sweeps'}]")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def model_path(cfg: DictConfig) -> Path:
    m = cfg.model
    if m.get("tiny") is not None and m.get("tiny_writer"):  # another family's tiny writer (e.g. tiny_llava)
        import importlib

        writer = importlib.import_module(str(m.tiny_writer))
        return writer.ensure_checkpoint(cache_dir() / "models", OmegaConf.to_container(m.tiny), seed=int(m.get("init_seed", 0)))
    if m.get("tiny") is not None:
        from dvlm_exp.models.tiny import ensure_checkpoint

        return ensure_checkpoint(cache_dir() / "models", OmegaConf.to_container(m.tiny), seed=int(m.get("init_seed", 0)))
    from dvlm_exp.run.paths import resolve_path

    return resolve_path(m.path)


def model_fingerprint(cfg: DictConfig) -> str | None:
    """resume.weights_fingerprint of the model's checkpoint folder; None when it cannot be
    resolved yet (bad input is reported by `check`, with a message saying what to do)."""
    try:
        return resume.weights_fingerprint(model_path(cfg))
    except Exception:  # noqa: BLE001 - a missing or bad path fails later, in check(), with its own message
        return None


def load_model(cfg: DictConfig):
    from dvlm_exp.registry import MODEL_FAMILIES

    m = cfg.model
    path = model_path(cfg)
    key = (m.family, str(path), m.dtype, m.device, bool(m.get("resize_vocab", True)))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # keep at most one model in memory
        family = MODEL_FAMILIES.get(m.family)
        _MODEL_CACHE[key] = family.from_pretrained(path, dtype=m.dtype, device=m.device,
                                                   resize_vocab=bool(m.get("resize_vocab", True)))
    model = _MODEL_CACHE[key]
    text_path = m.get("text_tower_path")
    if text_path and getattr(model, "text_tower_path", None) != str(text_path):  # TRIM's question encoder
        from dvlm_exp.models.llada_v import resolve_device
        from dvlm_exp.models.text_tower import TextTower

        # a plain attribute, not a submodule: the LLaDA-V module's parameters stay the checkpoint's
        object.__setattr__(model, "text_tower", TextTower.from_pretrained(text_path, device=resolve_device(m.device)))
        model.text_tower_path = str(text_path)
    return model


def build_pruner(cfg: DictConfig):
    from dvlm_exp.registry import PRUNERS

    p = OmegaConf.to_container(cfg.prune, resolve=True)
    name = p.pop("name")
    p.pop("position_ids", None)
    return PRUNERS.get(name)(ratio=float(cfg.ratio), seed=int(cfg.seed), **p)


def build_schedule(cfg: DictConfig):
    from dvlm_exp.registry import SCHEDULES

    s = OmegaConf.to_container(cfg.schedule, resolve=True)
    return SCHEDULES.get(s.pop("name"))(**s)


def build_generator(cfg: DictConfig):
    from dvlm_exp.decoding.generator import GenPreset, Generator

    check(cfg)
    model = load_model(cfg)
    g = OmegaConf.to_container(cfg.task.gen, resolve=True)
    preset = GenPreset(**g)
    return Generator(model, build_pruner(cfg), build_schedule(cfg), preset,
                     position_ids=cfg.prune.get("position_ids", "keep"), seed=int(cfg.seed),
                     sampler_kwargs=OmegaConf.to_container(cfg.model.sampler, resolve=True)
                     if cfg.model.get("sampler") else None,  # e.g. LaViDa-Dream's alg (conf/model/lavida_dream.yaml)
                     prefix_cache=cfg.model.get("prefix_cache", False))  # LaViDa Prefix-DLM (engine/prefix.py)


def task_entry(cfg: DictConfig) -> dict:
    t = cfg.task
    if t.get("synthetic") is not None:
        import importlib

        s = t.synthetic  # generated on first use by its module's ensure(dir, n, seed) (default: synth_docvqa)
        data_mod = importlib.import_module(s.get("module") or "dvlm_exp.evaluation.data.synth_docvqa")
        data = data_mod.ensure(cache_dir() / "data" / f"{t.lmms_task}-n{s.n}-s{s.seed}", n=int(s.n), seed=int(s.seed))
        return data_mod.task_entry(data)
    # Real benchmarks: the registered lmms-eval task (built-in or dvlm_exp/tasks), re-pointed at a
    # local mirror of its HF dataset repo when task.dataset_path is set (ecosystem.md §4.2; the
    # mirror was checked by validate.check_task_data before the model loaded).
    entry = {"task": t.lmms_task}
    if t.get("dataset_path"):
        import os

        entry["dataset_path"] = os.path.abspath(os.path.expanduser(str(t.dataset_path)))
    return entry
