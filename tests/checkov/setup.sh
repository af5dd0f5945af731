#!/usr/bin/env bash
# Create (or reuse) the side venv that runs checkov, the security scanner that
# tests/test_deploy.py runs on k8s.yaml and the Dockerfile.
#
# checkov must NOT be installed in the project venv: it pins older packaging, networkx,
# boto3 ... that would downgrade what the project needs.
#
# Usage: bash tests/checkov/setup.sh [VENV_DIR]   (default: <repo>/.venv-checkov)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
exec bash "$repo/tests/side_venv.sh" checkov "${1:-${CHECKOV_VENV:-$repo/.venv-checkov}}" \
    "$here/requirements.txt" checkov --version
