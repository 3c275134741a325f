#!/usr/bin/env bash
# `make lock`: resolve requirements.in once, in a new throw-away virtualenv, and write every
# installed package at its exact version into requirements.lock. Then run `make install` and
# `make test`, and commit the lock if the suite passes. torch is recorded in the header, not as a
# constraint (scripts/install.sh pins whatever torch build is installed); TORCH_SPEC picks it here.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
${PYTHON:-python3} -m venv "$tmp/venv"
P=$tmp/venv/bin/python
# shellcheck disable=SC2086
$P -m pip install $TORCH_SPEC
TV=$($P -c "import torch; print(torch.__version__.split('+')[0])")
sed -n 's/^#nodeps //p' requirements.in > "$tmp/nodeps.txt"
$P -m pip install --no-deps -r "$tmp/nodeps.txt"
$P -m pip install -r requirements.in "torch==$TV"
{
  echo "# requirements.lock: written by \`make lock\` (scripts/lock.sh) from requirements.in on $(date -u +%F)."
  echo "# Python $($P -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())')."
  echo "# \`make install\` uses it as pip constraints; refresh it with \`make lock\`, then \`make test\`."
  echo "# torch==$TV (installed first by scripts/install.sh; not a constraint, so another torch build can be used)"
  $P -m pip freeze --all --exclude-editable | grep -viE '^(pip|torch|dvlm[-_]exp)==' | LC_ALL=C sort -f
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages); now: make install && make test"
