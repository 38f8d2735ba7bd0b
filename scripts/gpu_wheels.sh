#!/usr/bin/env bash
# Wheels that the GPU benchmark machine lacks (it has torch, transformers, numpy, scipy, pyyaml,
# joblib, but no hqq, pymoo, hydra or omegaconf, and no registry access). Run here, carry the folder,
# install there with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# Usage: scripts/gpu_wheels.sh [DEST]   (default .whl, ignored by git)
set -euo pipefail
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"

# Binary or pure-python wheels published on PyPI, for CPython 3.12 on x86_64 Linux.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" \
  pymoo==0.6.2 moocore==0.3.2 cma==4.5.0 autograd==1.9.1 alive-progress==3.3.0 about-time==4.2.1 \
  graphemeu==0.7.2 Deprecated==1.3.1 dill==0.4.1 termcolor==3.3.0 cffi==2.1.1 pycparser==3.12 \
  platformdirs==4.14.7 hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0

# Published as source only (pure python): build the wheels here.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" hqq==0.2.8.post1 antlr4-python3-runtime==4.9.3

ls -1 "$DEST"
du -sh "$DEST"
