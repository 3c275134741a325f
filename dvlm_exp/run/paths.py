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
