#!/usr/bin/env bash
# Create (or reuse) the side venv that runs checkov, the security scanner that
# tests/test_deploy.py runs on k8s.yaml and the Dockerfile.
#
# checkov must NOT be installed in the project venv: it pins older packaging, networkx,
# boto3 ... that would downgrade what the project needs.
# Idempotent: does nothing when the venv already has the pinned version. Uses only PyPI.
#
# Usage: bash tests/checkov/setup.sh [VENV_DIR]   (default: <repo>/.venv-checkov)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-${CHECKOV_VENV:-$repo/.venv-checkov}}"
pins="$here/requirements.txt"
python="${PYTHON:-python3}"

stamp="$venv/.checkov-pins"
if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$pins" "$stamp"; then
    echo "checkov venv ready: $venv"
    exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins"
"$venv/bin/checkov" --version >/dev/null
cp "$pins" "$stamp"
echo "checkov venv ready: $venv"
