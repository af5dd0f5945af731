#!/usr/bin/env bash
# Create (or reuse) the side venv that runs bqemulator, the BigQuery emulator used by the tests.
#
# bqemulator must NOT be installed in the project venv: there it downgrades protobuf and its
# auto-loaded pytest plugin aborts every pytest run. It also needs numpy without declaring it.
# Idempotent: does nothing when the venv already has the pinned version. Uses only PyPI.
#
# Usage: bash tests/bqemu/setup.sh [VENV_DIR]   (default: <repo>/.venv-bqemu)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-${BQEMU_VENV:-$repo/.venv-bqemu}}"
pins="$here/requirements.txt"
python="${PYTHON:-python3}"

stamp="$venv/.fmel-bqemu-pins"
if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$pins" "$stamp"; then
    echo "bqemulator venv ready: $venv"
    exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins"
"$venv/bin/python" -c "import bqemulator, numpy" 
cp "$pins" "$stamp"
echo "bqemulator venv ready: $venv"
