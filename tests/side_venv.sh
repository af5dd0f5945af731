#!/usr/bin/env bash
# Create (or reuse) a side venv for a tool that must not live in the project venv (it would
# downgrade packages the project pins). Idempotent: does nothing when the venv already holds the
# pinned versions (a copy of the pins file is kept in the venv as the stamp). Uses only PyPI.
#
# Usage: bash tests/side_venv.sh NAME VENV_DIR PINS_FILE CHECK_COMMAND...
#   CHECK_COMMAND runs with the venv's bin/ first on PATH, to prove the install works.
set -euo pipefail

name="$1" venv="$2" pins="$3"
shift 3
python="${PYTHON:-python3}"
stamp="$venv/.side-venv-pins"

if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$pins" "$stamp"; then
    echo "$name venv ready: $venv"
    exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins"
PATH="$venv/bin:$PATH" "$@" >/dev/null
cp "$pins" "$stamp"
echo "$name venv ready: $venv"
