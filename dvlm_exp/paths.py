"""Where generated artefacts live (tiny checkpoints, synthetic datasets).

`DVLM_CACHE` overrides the default `~/.cache/dvlm_exp`.
"""

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DVLM_CACHE") or Path.home() / ".cache" / "dvlm_exp")
