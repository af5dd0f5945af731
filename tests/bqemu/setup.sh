#!/usr/bin/env bash
# Create (or reuse) the side venv that runs bqemulator, the BigQuery emulator used by the tests.
#
# bqemulator must NOT be installed in the project venv: there it downgrades protobuf and its
# auto-loaded pytest plugin aborts every pytest run. It also needs numpy without declaring it.
#
# Usage: bash tests/bqemu/setup.sh [VENV_DIR]   (default: <repo>/.venv-bqemu)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
exec bash "$repo/tests/side_venv.sh" bqemulator "${1:-${BQEMU_VENV:-$repo/.venv-bqemu}}" \
    "$here/requirements.txt" python -c "import bqemulator, numpy"
