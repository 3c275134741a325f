#!/usr/bin/env bash
# `make install`: the locked environment, in the Python the Makefile chose (PY): the active
# virtualenv / conda env, else the project's .venv, created here when missing.
#
# 1. torch: kept if already importable (a GPU user installs the CUDA build first, or sets
#    TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128");
#    else the version the lock was made with.
# 2. lmms-eval with --no-deps (requirements.in says why), at the lock's version.
# 3. requirements.in under requirements.lock as constraints: every package at its locked version,
#    torch pinned to what is installed.
# 4. this project, editable, without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOCK=requirements.lock

if [ "$PY" = .venv/bin/python ] && [ ! -x .venv/bin/python ]; then
  echo "make install: creating the project virtualenv .venv (activate another env first to install there)"
  ${PYTHON:-python3} -m venv .venv
fi
echo "make install: into $($PY -c 'import sys; print(sys.prefix)') ($($PY --version))"

TORCH_LOCKED=$(sed -n 's/^# torch==\([^ ]*\).*/\1/p' "$LOCK")
if ! $PY -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url ...)
  $PY -m pip install ${TORCH_SPEC:-torch==$TORCH_LOCKED} -c "$LOCK"   # torch's own dependencies at their locked versions
fi
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$TORCH_VERSION" != "$TORCH_LOCKED" ]; then
  echo "make install: note: torch $TORCH_VERSION is installed; the lock was resolved and tested with torch $TORCH_LOCKED"
fi

nodeps=$(mktemp)
trap 'rm -f "$nodeps"' EXIT
sed -n 's/^#nodeps //p' requirements.in > "$nodeps"
$PY -m pip install --no-deps -r "$nodeps" -c "$LOCK"
$PY -m pip install -r requirements.in -c "$LOCK" "torch==${TORCH_VERSION}"
$PY -m pip install --no-deps -e .
$PY -c "import torch, transformers, lmms_eval.evaluator, hydra, wandb, datasets, pandas; print('dvlm_exp install ok: torch', torch.__version__, 'transformers', transformers.__version__)"

# Optional: a single-node SLURM cluster on this machine for `hydra/launcher=slurm_dev` (root,
# Debian/Ubuntu; `make test` starts it by itself when it can, DVLM_SLURM=0 opts out).
if [ "${DVLM_SLURM:-0}" = 1 ]; then
  bash scripts/slurm/up.sh
fi
