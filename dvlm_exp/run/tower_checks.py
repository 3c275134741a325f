"""Config checks for pruning methods that act in the vision path (ToMe inside SigLIP, TRIM before
the projector), from config files only: called by dvlm_exp.run.validate before any weight loads."""

from __future__ import annotations

from omegaconf import DictConfig

from dvlm_exp.errors import ConfigError


# per tower stage, the model families whose vision path runs it (dvlm_exp/engine/vision.py; the others
# refuse it): "siglip_layers" ToMe inside SigLIP, "output" TRIM before the projector (LaViDa: the study's
# LaViDa ports, study_tome_lavida / study_trim_lavida)
TOWER_FAMILIES = {"siglip_layers": ("llada_v", "lavida_dream", "lavida_llada"),
                  "output": ("llada_v", "lavida_dream", "lavida_llada")}


def check_tower(cfg: DictConfig, facts: dict) -> None:
    """A method acting in the vision tower (class fact `tower_stage`, or `tower_when` {field: value}):
    the model family must have a tower path, and ToMe's per-layer r must fit the tower."""
    p = cfg.prune
    when = facts.get("tower_when") or {}
    if not facts.get("tower_stage") and not (when and all(p.get(k) == v for k, v in when.items())):
        return
    how = ", ".join(f"prune.{k}={v}" for k, v in when.items()) or f"prune={p.name}"
    families = TOWER_FAMILIES.get(facts.get("tower_stage") or "siglip_layers", ())  # tower_when: ToMe's stage
    if str(cfg.model.family) not in families:
        alt = "prune.where=llm_input" if when else "a decoder-layer method"
        raise ConfigError(f"{how} acts in the vision path, which only the {', '.join(families)} family exposes "
                          f"to methods; model={cfg.model.name} ({cfg.model.family}) has no tower path: use "
                          f"model={' / '.join(families)} / tiny / sandbox, or {alt}")
    if str(cfg.schedule.name) != "first_step":
        raise ConfigError(f"{how} acts once per request, in the vision tower before the first step; "
                          f"schedule={cfg.schedule.name} would not change when: use schedule=first_step")
    r = p.get("r")
    table = p.get("r_by_ratio")
    if table is not None:
        from dvlm_exp.pruning.tome import ratio_key

        if r is not None:
            raise ConfigError("set prune.r or prune.r_by_ratio, not both (prune.r=null keeps the table)")
        key = ratio_key(cfg.ratio)
        if key not in table:
            raise ConfigError(f"prune.r_by_ratio lists r for ratio {', '.join(map(str, table))} only, not ratio={key}: "
                              f"use one of those ratios, or prune.r_by_ratio=null (r from the ratio)")
        r = table[key]
    if r is None:
        return
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ConfigError(f"prune.r={r} must be null (from the ratio) or an integer >= 0 (tokens merged per tower layer)")
    patches, layers = tower_size(cfg)
    limit = patches // (layers + 1)  # dvlm_exp/pruning/tome.py tower_r_limit
    if r > limit:
        raise ConfigError(f"prune.r={r} is too large for model={cfg.model.name}'s tower ({patches} patches per view, "
                          f"{layers} layers): a layer merges at most half its tokens, so r <= {limit}; "
                          f"use prune.r<={limit} or prune.r=null (r from the ratio)")


def tower_size(cfg: DictConfig) -> tuple[int, int]:
    """(patches per view, encoder layers run) of the configured LLaDA-V / LaViDa tower, from config files."""
    m = cfg.model
    if m.get("tiny") is not None:
        t = m.tiny
        return (int(t.image_size) // int(t.patch_size)) ** 2, int(t.vision_layers)
    from dvlm_exp.models.checkpoint import CheckpointError
    from dvlm_exp.reporting.plan import dims_from_config
    from dvlm_exp.run.paths import resolve_path

    try:
        if str(m.family) == "llada_v":
            d = dims_from_config(resolve_path(m.path))
            return int(d["vision_patches"]), int(d["vision_layers"])
        return _lavida_tower_size(resolve_path(m.path), str(m.get("model_type")))
    except CheckpointError as e:
        raise ConfigError(str(e)) from e


def _lavida_tower_size(path, model_type: str) -> tuple[int, int]:
    """LaViDa (OLMo- or Qwen-named LLM config): only the tower's values, as `dims_from_config` reads
    them (the mm_vision_tower folder's config.json when present, else SigLIP so400m's)."""
    import json

    from dvlm_exp.models.checkpoint import read_config
    from dvlm_exp.reporting.plan import SO400M_TOWER

    cfg = read_config(path, model_type)
    tv = dict(SO400M_TOWER)
    folder = path / str(cfg.get("mm_vision_tower", "")) / "config.json"
    if cfg.get("mm_vision_tower") and folder.is_file():
        tc = json.loads(folder.read_text())
        tv.update({k: tc[k] for k in SO400M_TOWER if k in tc})
    pps = int(tv["image_size"]) // int(tv["patch_size"])
    return pps * pps, int(tv["num_hidden_layers"]) - 1  # the official tower drops its last layer


def check_text_tower(cfg: DictConfig) -> None:
    """prune=trim needs a SigLIP text tower whose embedding size (the pooler's projection_size, or the
    hidden_size with prune.text_embedding=first_token) is the vision tower's (dvlm_exp/models/text_tower.py),
    checked from config files only."""
    from dvlm_exp.models.text_tower import DOWNLOAD_HINT, TextTowerError, text_tower_facts

    m = cfg.model  # the family was checked by check_tower (TRIM's tower_stage)
    path = m.get("text_tower_path")
    if not path:
        raise ConfigError(f"prune={cfg.prune.name} needs model.text_tower_path=/path/to/siglip: {DOWNLOAD_HINT}")
    try:
        facts = text_tower_facts(path)
        dim = facts["hidden" if cfg.prune.get("text_embedding") == "first_token" else "dim"]
    except TextTowerError as e:
        raise ConfigError(str(e)) from e
    if m.get("tiny") is not None:
        vis = int(m.tiny.get("vision_hidden_size", 32))
    else:
        from dvlm_exp.models.checkpoint import read_config
        from dvlm_exp.run.paths import resolve_path

        c = read_config(resolve_path(m.path), m.get("model_type", "llava_llada"))
        vis = int(c.get("mm_hidden_size", 1152))
    if dim != vis:
        raise ConfigError(f"model.text_tower_path={path}: its text embedding has {dim} dims, the vision tower's "
                          f"features {vis}; TRIM dots them directly, so use the SigLIP checkpoint the vision "
                          f"tower comes from ({DOWNLOAD_HINT})")
