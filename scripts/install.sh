#!/usr/bin/env bash
# One-command install (called by `make install`). Installs into the current Python environment
# (use a virtualenv if you like). lmms-eval is installed with --no-deps and its runtime
# dependencies from requirements.txt: its torchvision requirement would otherwise replace a
# CPU torch with a multi-GB CUDA build (see docs/ and shared/reference ecosystem.md §7).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # override on a GPU box, e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index

if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install "$TORCH_SPEC"
fi
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
$PY -m pip install --no-deps "lmms-eval==0.7.3"
$PY -m pip install -r requirements.txt "torch==${TORCH_VERSION}" \
  "hydra-core>=1.3,<1.4" "hydra-submitit-launcher>=1.2" "submitit>=1.5" "omegaconf>=2.3" \
  pandas matplotlib tqdm safetensors tokenizers pillow pytest
$PY -m pip install --no-deps -e .
$PY -c "import torch, transformers, lmms_eval, hydra, wandb, datasets, pandas; print('dvlm_exp install ok: torch', torch.__version__, 'transformers', transformers.__version__)"
# Optional: a single-node SLURM cluster on this machine for `hydra/launcher=slurm_dev` (root,
# Debian/Ubuntu; `make test` starts it by itself when it can, DVLM_SLURM=0 opts out).
if [ "${DVLM_SLURM:-0}" = 1 ]; then
  bash scripts/slurm/up.sh
fi
