#!/usr/bin/env bash
# Builds a wheel, installs it into a fresh venv holding the same torch, and runs an
# import-and-call smoke test from outside the source tree.
set -euo pipefail
PY=${1:-.venv/bin/python}
TORCH_SPEC=${2:-torch==2.14.1}
root=$(pwd)
rm -rf dist
$PY -m pip wheel --no-build-isolation --no-deps -w dist .
wheel=$(ls dist/chameleon_ext-*.whl)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "$TORCH_SPEC" numpy pyyaml
"$tmp/venv/bin/pip" install -q --no-deps "$wheel"
cd "$tmp"
"$tmp/venv/bin/python" "$root/.ci/wheel_smoke.py"
echo "wheel $wheel installs into a fresh venv and works"
