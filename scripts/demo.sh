#!/usr/bin/env bash
# The main job: install dpfast into .venv and train a small DP diffusion model on Fashion-MNIST
# (Debian's dataset-fashion-mnist), printing the privacy spent. Output in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "installing Debian's dataset-fashion-mnist (needs root)..." >&2
  ${SUDO:-$( [ "$(id -u)" = 0 ] || echo sudo )} apt-get install -y -q dataset-fashion-mnist
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q .
.venv/bin/dpfast train --preset demo --out runs/demo "$@"
cat <<'NEXT'

next: the dpfast command lives in .venv, so first
    source .venv/bin/activate
then, for example (sampling ~25 s; evaluation ~1 minute the first time, on 2 cores):
    dpfast sample --model runs/demo --num 2000 --out runs/demo/samples.npz --grid runs/demo/grid.png
    dpfast evaluate --samples runs/demo/samples.npz --out runs/demo/eval.json
NEXT
