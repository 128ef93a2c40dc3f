#!/usr/bin/env bash
# Install dpfast with its test extras into .venv (CPU torch 2.13.0) and run the test suite.
# The compiled extension dpfast._C is required here (DPFAST_REQUIRE_EXT=1): the tests exercise the
# installed wheel, not the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q ".[test,bench,triton]"
export DPFAST_REQUIRE_EXT=1 TRITON_INTERPRET=1
# run from tests/ so that `import dpfast` resolves to the installed package, not ./dpfast
cd tests && ../.venv/bin/python -m pytest -q -p no:cacheprovider --rootdir=.. -c ../pyproject.toml "$@" .
