#!/usr/bin/env bash
# Wheels for a GPU machine without network access (Python 3.12, CuPy, NumPy, h5py, pytest, tqdm,
# matplotlib present): Hydra and its needs (pure Python, via ../shared/device/wheels.sh) plus the
# compiled and pure-Python packages tissuesim needs that such a machine lacks (scipy, tifffile),
# built for CPython 3.12 manylinux x86_64. Everything lands in .whl/ (git-ignored, < 64 MiB).
# Then on the device:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; bash tools/gpu_check.sh "$OUT"
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/device/wheels.sh tifffile pytest-timeout
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl "scipy>=1.10,<1.18"
ls -la .whl
du -sh .whl
