#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (no network needed): the GPU tests (parity of
# every kernel with its NumPy twin, GPU physics checks) and the GPU benchmarks, all results as
# files under OUT. Budget: under 5 minutes in all.
#   bash tools/gpu_check.sh OUT      (or ./dev gpu-check OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.csv" || status=1
"$PY" -c "import cupy; print('cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())" | tee "$OUT/cupy.txt"

echo "== GPU tests"
timeout 170 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for b in diffusion agents step; do
  if [ -f "bench/$b.py" ]; then
    echo "== bench/$b.py"
    timeout 90 "$PY" "bench/$b.py" --backend cupy --out "$OUT" 2>&1 | tee "$OUT/bench_$b.txt" | tail -30
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  fi
done
echo "gpu-check finished with status $status; results in $OUT"
exit $status
