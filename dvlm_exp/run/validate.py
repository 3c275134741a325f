"""Config checks that run before any weight loads.

Each failure is one line naming the key and the valid range, raised as `ConfigError`;
the runner (and run.py, for `check_overrides`) prints it as `error: ...` and exits 2.

`check_overrides` checks the command line itself (run.py, before Hydra runs): override syntax,
config-group options and key names, through Hydra's own override parser and compose API.
`check` checks the composed config (values, ranges, the checkpoint's files) before weights load;
torch is imported only with the chosen method's class (whose own file declares its config facts)
and for `model.device=cuda...` (to ask whether CUDA is available).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dvlm_exp.registry import MODEL_FAMILIES, PRUNERS, SCHEDULES, UnknownNameError

from dvlm_exp.errors import ConfigError
from dvlm_exp.run.tower_checks import check_text_tower, check_tower


# model.dtype names the loaders accept (dvlm_exp/models/llada_v.py `_DTYPES`, used by every family;
# kept here as names so that this module imports no torch; tests/test_bad_input.py keeps them equal)
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
SEED_MAX = 2**32 - 1  # numpy's seed range (lmms-eval seeds numpy with `seed`)
BOOL_KEYS = ("loyalty", "progress", "resume_cache", "model.resize_vocab")


# model= -> the released checkpoint a missing model.path should be downloaded from (conf/model/*.yaml comments)
HUB_IDS = {"llada_v": "GSAI-ML/LLaDA-V", "lavida_llada": "jacklishufan/lavida-llada-v1.0-instruct",
           "lavida_dream": "jacklishufan/lavida-dream-v1.0-instruct", "llava_1_5": "llava-hf/llava-1.5-7b-hf",
           "llava_next": "llava-hf/llava-v1.6-vicuna-7b-hf"}


def model_depth(cfg: DictConfig) -> int:
    """Decoder layers of the configured model, from the tiny spec or the checkpoint's config.json."""
    from dvlm_exp.models.checkpoint import CheckpointError, read_config

    m = cfg.model
    if m.get("tiny") is not None:
        return int(m.tiny.num_hidden_layers)
    hub = HUB_IDS.get(str(m.name))
    fetch = (f"; e.g. `hf download {hub} --local-dir /path/to/{hub.split('/')[-1]}` on a machine with internet"
             if hub else "")
    if OmegaConf.is_missing(m, "path") or m.get("path") in (None, ""):
        raise ConfigError(f"model={m.name} needs model.path=/path/to/checkpoint (a local copy of the released weights{fetch})")
    try:
        from dvlm_exp.run.paths import resolve_path

        if not resolve_path(m.path).is_dir():  # named per model (the checkpoint module's message names LLaDA-V)
            hint = (f"download it (`hf download {hub} --local-dir {m.path}`) on a machine with internet"
                    if hub else "download the checkpoint")
            raise ConfigError(f"model.path={m.path} is not a directory: {hint}, or point model.path at an "
                              f"existing copy of model={m.name}'s checkpoint")
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
    """Can lmms-eval load the task's data? (dvlm_exp.evaluation.task_data; fails fast instead of 5 hidden retries)."""
    from dvlm_exp.evaluation.task_data import TaskDataError
    from dvlm_exp.evaluation.task_data import check_task_data as _check

    try:
        _check(cfg)
    except TaskDataError as e:
        raise ConfigError(str(e)) from e


def check(cfg: DictConfig, data: bool = True, weights: bool = True) -> None:
    """All checks before weights load; `data=False` skips `check_task_data` (the dataset's reachability),
    `weights=False` the weight files (planning tools read only config.json)."""
    try:
        PRUNERS.check(cfg.prune.name)
        MODEL_FAMILIES.check(cfg.model.family)
        SCHEDULES.check(cfg.schedule.name)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from e

    ratio = cfg.ratio
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (0.0 < float(ratio) <= 1.0):
        raise ConfigError(f"ratio={ratio} is outside (0, 1]: ratio is the fraction of visual tokens kept (e.g. ratio=0.35)")
    _check_scalars(cfg)

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
    if g.steps > g.gen_length:
        raise ConfigError(f"task.gen.steps={g.steps} is more than task.gen.gen_length={g.gen_length}: every step unmasks "
                          f"at least one answer token, so use task.gen.steps<={g.gen_length} (or a longer gen_length)")
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
        model_depth(cfg)  # checks model.path and config.json before anything loads
        if weights:
            check_weight_files(cfg)  # every safetensors shard present and as long as its header says
    _check_prune(cfg)

    if cfg.limit is not None and (not isinstance(cfg.limit, int) or cfg.limit <= 0):
        raise ConfigError(f"limit={cfg.limit} must be a positive integer or null (all samples)")

    _check_cuda(cfg.model.device)  # imports torch, only for model.device=cuda...

    if data:
        check_task_data(cfg)


def _check_scalars(cfg: DictConfig) -> None:
    """seed, the boolean switches, model.dtype and the device's name (no torch)."""
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed={seed} must be a non-negative integer (at most 2**32-1), e.g. seed=0")
    absent = object()
    for key in BOOL_KEYS:
        val = OmegaConf.select(cfg, key, default=absent)
        if val is not absent and not isinstance(val, bool):
            raise ConfigError(f"{key}={val} must be true or false")
    m = cfg.model
    if m.get("dtype") not in DTYPES:
        raise ConfigError(f"model.dtype={m.get('dtype')} must be one of {', '.join(DTYPES)}")
    dev = m.get("device")
    if not isinstance(dev, str) or not DEVICE_RE.fullmatch(dev):
        raise ConfigError(f"model.device={dev} is not a device dvlm_exp runs on: use auto (cuda when available), cpu, cuda or cuda:<index>")


def _check_cuda(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch  # the run imports it next anyway

    if not torch.cuda.is_available():
        raise ConfigError(f"model.device={device} but torch {torch.__version__} sees no CUDA device "
                          f"(torch.cuda.is_available() is False): use model.device=cpu, or model.device=auto "
                          f"(cuda when available); check CUDA_VISIBLE_DEVICES and that torch is a CUDA build")
    idx = int(device.split(":")[1]) if ":" in device else 0
    if idx >= torch.cuda.device_count():
        raise ConfigError(f"model.device={device} but torch sees {torch.cuda.device_count()} CUDA device(s): "
                          f"use model.device=cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def check_weight_files(cfg: DictConfig) -> None:
    """The checkpoint's safetensors files: listed shards present, each as long as its header says
    (dvlm_exp.models.checkpoint.weight_files; reads headers only, never tensor data)."""
    from dvlm_exp.models.checkpoint import CheckpointError, weight_files
    from dvlm_exp.run.paths import resolve_path

    try:
        weight_files(resolve_path(cfg.model.path))
    except CheckpointError as e:
        raise ConfigError(str(e)) from e


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
    """Closed choices, field combinations and layer indices, as the method's class declares them
    (read from its source: PRUNERS.facts, no import)."""
    p = cfg.prune
    facts = PRUNERS.facts(p.name)
    for key, allowed in {**COMMON_CHOICES, **facts.get("choices", {})}.items():
        if key in p and p[key] not in allowed:
            raise ConfigError(f"prune.{key}={p[key]} must be one of {', '.join(map(str, allowed))}")
    for key, by_value in facts.get("requires", {}).items():
        for other, want in by_value.get(p.get(key), {}).items():
            if p.get(other) != want:
                raise ConfigError(f"prune.{key}={p[key]} uses {other}={want}: add prune.{other}={want}")
    check_tower(cfg, facts)
    if facts.get("needs_text_tower"):
        check_text_tower(cfg)
    declared = facts.get("layer_fields", {"layer": 0})
    fields = {k: 0 for k in p if LAYER_FIELD.search(str(k))} | {k: lo for k, lo in declared.items() if k in p}
    if not fields:
        return
    depth = model_depth(cfg)
    for key, lo in fields.items():
        val = p[key]
        if val is None:
            continue
        vals = list(val) if OmegaConf.is_list(val) or isinstance(val, (list, tuple)) else [val]
        for v in vals:
            if not isinstance(v, int) or isinstance(v, bool) or not (lo <= v <= depth - 1):
                raise ConfigError(
                    f"prune.{key}={val} is outside [{lo}, {depth - 1}] for model={cfg.model.name} ({depth} decoder layers)"
                )


# choices every method has (dvlm_exp/pruning/base.py: position_ids, ROUNDING; tests/test_layout.py keeps them equal)
COMMON_CHOICES = {"position_ids": ("keep", "renumber"), "rounding": ("round", "floor")}
LAYER_FIELD = re.compile(r"(^|_)layers?$")


# ----------------------------------------------------------------------------- the command line
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
_SKIP_FLAGS = ("help", "hydra_help", "shell_completion", "info", "experimental_rerun",
               "config_path", "config_name", "config_dir")
_MAX_COMBOS = 16  # multirun: compose every combination of the top-level sweeps up to this many, else one by one


def check_overrides(argv: list[str], conf_dir: str | Path, config_name: str = "config") -> None:
    """The command line of run.py, before Hydra runs it: override syntax, config-group options and
    key names, checked with Hydra's own parser and compose API (the same config search path, so
    sweeps/ counts when run from the repo root). Raises `ConfigError` with what to do instead of
    Hydra's message + exit 1. Imports no torch. Hydra's flags are left alone: --help, --hydra-help,
    --info, --shell-completion and the config path/name flags skip the check (Hydra answers them
    itself); --cfg / -m / hydra.* / +key / ++key / ~key are checked as Hydra would compose them."""
    if "--version" in argv:
        return
    try:
        from hydra._internal.utils import get_args_parser  # hydra.main's own command-line grammar
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import OverrideParseException
    except ImportError:  # another Hydra layout: Hydra reports bad input itself
        return
    import contextlib
    import io

    try:  # argparse's own errors are left to Hydra (same parser, same message): not printed twice
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return
    if any(getattr(args, flag, None) for flag in _SKIP_FLAGS):
        return
    try:
        overrides = OverridesParser.create().parse_overrides(list(args.overrides))
    except OverrideParseException as e:
        reason = str(e.message).strip().splitlines()[0]
        raise ConfigError(
            f"cannot parse the override '{e.override}' ({reason}): write key=value, a list as key=[a,b] with "
            f"its brackets closed, a string holding spaces, commas, brackets or '=' in quotes (key='a,b'); "
            f"grammar: {GRAMMAR}") from None
    try:
        _compose_all(overrides, Path(conf_dir), config_name, multirun=bool(args.multirun))
    except ConfigError:
        raise
    except _Skip:
        return
    except Exception:  # noqa: BLE001 - anything unforeseen: Hydra composes again and reports it itself
        return


class _Skip(Exception):
    pass


def _compose_all(overrides, conf_dir: Path, config_name: str, multirun: bool) -> None:
    import itertools
    import warnings

    from hydra import compose, initialize_config_dir

    sweeps = [o for o in overrides if o.is_sweep_override()]

    def _compose(lines: list[str], hydra_cfg: bool = False) -> DictConfig:
        with warnings.catch_warnings():  # e.g. "sweeps is not available": Hydra prints it once itself
            warnings.simplefilter("ignore")
            return compose(config_name=config_name, overrides=lines, return_hydra_config=hydra_cfg)

    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        if sweeps and not multirun:
            plain = [o.input_line for o in overrides if not o.is_sweep_override()]
            try:
                mode = str(OmegaConf.select(_compose(plain, True), "hydra.mode"))
            except Exception:  # noqa: BLE001 - the plain overrides' own error is reported below, per job
                mode = None
            if mode != "RunMode.MULTIRUN" and mode != "MULTIRUN":
                o = sweeps[0]
                raise ConfigError(
                    f"{o.input_line} gives several values: add -m to run one job per value "
                    f"(python run.py -m {o.input_line} ...), or quote a literal string: {o.get_key_element()}='"
                    f"{o.input_line.split('=', 1)[1]}'")
            multirun = True
        choices: list[list[tuple[object, str]]] = []
        for o in overrides:
            if not o.is_sweep_override():
                choices.append([(o, o.input_line)])
                continue
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # noqa: BLE001 - glob() needs Hydra's config loader: Hydra checks it
                continue
            if "." in o.key_or_group:  # a value sweep: any one value shows whether the key exists
                values = values[:1]
            choices.append([(o, f"{o.get_key_element()}={v}") for v in values])
        n = 1
        for c in choices:
            n *= len(c)
        if n <= _MAX_COMBOS:
            jobs = list(itertools.product(*choices))
        else:  # each value once, the other sweeps at their first value
            first = [c[0] for c in choices]
            jobs = [tuple(first)] + [tuple(first[:i] + [v] + first[i + 1:]) for i, c in enumerate(choices) for v in c[1:]]
        for job in jobs:
            lines = [line for _, line in job]
            try:
                _compose(lines)
            except Exception as e:  # noqa: BLE001 - translated below, or left to Hydra
                err = _explain(e, list(job), _compose, conf_dir)
                swept = [line for o, line in job if o.is_sweep_override()]
                if isinstance(err, ConfigError) and swept:  # which job of the multirun
                    err = ConfigError(f"{err} [in the multirun job {' '.join(swept)}]")
                raise err from None


def _explain(e: Exception, job: list, compose_fn, conf_dir: Path) -> Exception:
    """A ConfigError saying what to do for Hydra's composition error `e` of one job's overrides,
    or _Skip (Hydra reports it itself)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        opts = sorted(str(x) for x in e.options)
        close = difflib.get_close_matches(name, opts, n=1, cutoff=0.6)
        where = [f"conf/{group}/" for d in [conf_dir / group] if d.is_dir()]
        where += [f"sweeps/{group}/" for d in [conf_dir.parent / "sweeps" / group] if d.is_dir()]  # the project's sweeps/
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        files = f" (the yaml files in {' and '.join(where)})" if where else ""
        return ConfigError(f"{group}={name}: no config '{name}' in group '{group}'{hint}; use one of: {', '.join(opts)}{files}")
    if not isinstance(e, ConfigCompositionException):
        return _Skip(str(e))
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.match(r"Could not (override|delete from config\.|append to config\.) .*?'([^']+)'", msg)
    if not m:
        cause = e.__cause__
        why = f" ({str(cause).strip().splitlines()[0]})" if cause is not None and str(cause).strip() else ""
        return ConfigError(f"{msg}{why}: fix that override (python run.py --cfg job prints the composed config; "
                           f"grammar: {GRAMMAR})")
    what, key = m.group(1), m.group(2)
    hits = [(o, line) for o, line in job if o.key_or_group == key]
    line = hits[0][1] if hits else key
    value = line.split("=", 1)[1] if "=" in line else None
    rest = [ln for o, ln in job if o.key_or_group != key]
    cfg = None
    for lines in (rest, []):
        try:
            cfg = compose_fn(lines, True)
            break
        except Exception:  # noqa: BLE001
            continue
    if what.startswith("append"):
        return ConfigError(f"{line}: {key} already exists, so it needs no '+': set it with {key}={value} (or ++{key}={value})")
    guess, known = _closest_key(key, cfg)
    if what.startswith("delete"):
        hint = f": did you mean ~{guess}?" if guess else (f"; its level holds {known}" if known else "")
        return ConfigError(f"{line}: the config has no key {key} to delete{hint}")
    if guess:
        hint = f"did you mean {guess}={value}?" if value is not None else f"did you mean {guess}?"
    else:
        hint = f"its level holds {known}" if known else "python run.py --cfg job prints every key"
    return ConfigError(f"{line}: {key} is not a key of the config: {hint} "
                       f"(a new key needs a '+': +{key}={value}; python run.py --help lists the config groups)")


def _closest_key(key: str, cfg: DictConfig | None) -> tuple[str | None, str]:
    """(the nearest existing dotted key, the keys at the level where `key` leaves the config)."""
    if cfg is None:
        return None, ""
    parts = key.replace("/", ".").split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None, ""
        keys = [str(k) for k in node.keys()]
        if part in keys:
            node = node._get_node(part)
            continue
        close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
        known = ", ".join(sorted(keys)[:30]) + (", ..." if len(keys) > 30 else "")
        if close:
            return ".".join(parts[:i] + [close[0]] + parts[i + 1:]), known
        return None, known
    return None, ""
