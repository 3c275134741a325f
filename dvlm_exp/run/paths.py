"""Where generated artefacts live (tiny checkpoints, synthetic datasets).

`DVLM_CACHE` overrides the default `~/.cache/dvlm_exp`.
"""

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DVLM_CACHE") or Path.home() / ".cache" / "dvlm_exp")


PKG_PREFIX = "pkg://"


def resolve_path(p) -> Path:
    """A configured path: `pkg://dvlm_exp/assets/sandbox` is inside the installed package
    (the checkpoint shipped with the project), a Hugging Face hub id `org/name` that is not a local
    path resolves to its snapshot in the local HF cache (models.checkpoint.resolve_hub_id), anything
    else is a filesystem path."""
    s = str(p)
    if s.startswith(PKG_PREFIX):
        rel = s[len(PKG_PREFIX):]
        top, _, rest = rel.partition("/")
        if top != "dvlm_exp":
            raise ValueError(f"{s!r}: only pkg://dvlm_exp/... paths are known")
        return Path(__file__).resolve().parents[1] / rest
    from dvlm_exp.models.checkpoint import local_dir

    return local_dir(Path(s).expanduser())  # `org/name` in the local HF cache (CheckpointError with `hf download` if not)


# ---- config resolvers: sweeps and outputs from the project, whatever the working directory ----
# conf/config.yaml names Hydra's search path and run dirs through these, so that
# `python /path/to/run.py -m +sweep=...` from another directory finds sweeps/ and writes into the
# project's outputs/ (issue 18 item 1). Registered on `import dvlm_exp` (every process that composes
# or resolves the config imports the package first: run.py, the scripts, a submitit worker
# unpickling the run-dir lock callback).

def project_root() -> Path:
    """The checkout holding conf/, sweeps/ and run.py (the package's parent directory)."""
    return Path(__file__).resolve().parents[2]


def outputs_dir() -> Path:
    """Where runs, multiruns and sweeps are written: `$DVLM_OUTPUTS`, else `<project>/outputs`."""
    env = os.environ.get("DVLM_OUTPUTS")
    return Path(env).expanduser().resolve() if env else project_root() / "outputs"


CREATED: set[str] = set()  # run dirs new_dir made in this process (dvlm_exp.run.resume.discard_new_run_dir)


def new_dir(base: str) -> str:
    """A run dir nobody else has: `base` itself when it does not exist yet, else `base-2`, `base-3`, ...
    Claimed with an exclusive mkdir, so two runs started in the same second (same `${now:...}`)
    get two dirs. Resolved once per config (the resolver is cached); used for the single-run dir only
    (a sweep dir is resolved again while sweep files are merged, and must stay one dir per sweep)."""
    base_path = Path(base)
    base_path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        cand = base_path if i == 1 else base_path.with_name(f"{base_path.name}-{i}")
        try:
            cand.mkdir()
            if not CREATED:
                import atexit

                atexit.register(_drop_unused)
            CREATED.add(os.path.realpath(cand))
            return str(cand)
        except FileExistsError:
            continue
    raise OSError(f"no free run dir next to {base_path}")


def _drop_unused() -> None:
    """At exit: remove the dirs new_dir claimed that stayed empty (a config resolved only to be shown)."""
    for d in CREATED:
        try:
            os.rmdir(d)  # only an empty dir
        except OSError:
            pass


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    for name, fn, cache in (("dvlm_root", lambda: str(project_root()), False),
                            ("dvlm_outputs", lambda: str(outputs_dir()), False),
                            ("dvlm_new_dir", new_dir, True)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=cache)
