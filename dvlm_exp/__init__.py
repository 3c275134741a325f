"""dvlm_exp: visual-token pruning experiments for diffusion vision-language models.

Importing the package is cheap (no torch, no lmms-eval); heavy modules are imported lazily
by the runner so that `python run.py --help` and config errors answer fast.
"""

__version__ = "0.1.0"

from dvlm_exp.run.paths import register_resolvers as _register_resolvers  # noqa: E402

try:  # ${dvlm_root:}, ${dvlm_outputs:}, ${dvlm_new_dir:...} in conf/config.yaml (dvlm_exp/run/paths.py)
    _register_resolvers()
except ModuleNotFoundError:  # a bare interpreter (no omegaconf) importing dvlm_exp._venv to re-exec into .venv
    pass
