#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (no network needed): the GPU tests (parity of
# every kernel with its NumPy twin, the whole simulation on CuPy against NumPy, GPU physics
# checks) and the GPU benchmarks (diffusion, agents, whole step, scaling, host waits per step),
# all results as files under OUT. Each part has its own time limit and writes as it goes, so a
# part that runs long loses only itself; the limits, with 3 s of grace each, add up to under
# 5 minutes.
#   bash tools/gpu_check.sh OUT      (or ./dev gpu-check OUT)
# Files: gpu.csv, cupy.txt, gpu_tests.txt/.xml, gpu_tests_simulation.txt/.xml, diffusion_gpu.json,
# agents_gpu.json,
# step_gpu.json, step_gpu_baseline.json, scaling_gpu.json, syncs_gpu.json, *.txt, status.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
failed=""
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.csv" || status=1
"$PY" -c "import cupy, numpy; print('cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(), 'numpy', numpy.__version__)" | tee "$OUT/cupy.txt"

part() { # name, seconds, command...
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit ${secs}s)"
  local t0=$SECONDS
  # SIGINT first (pytest then still writes its junit XML and durations for the tests it ran),
  # SIGKILL 3 s later if still running: a part takes at most its limit + 3 s
  timeout -s INT -k 3 "$secs" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.txt"
  echo "-- $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
  if [ $rc -ne 0 ]; then status=1; failed="$failed $name"; fi
}

# kernels against their twins first (short tests), then the whole simulation on CuPy; each part
# reports the durations of its slowest tests, so the next run's limits can be set from them
part gpu_tests 55 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o timeout=60 --durations=15 --continue-on-collection-errors --junitxml="$OUT/gpu_tests.xml" --ignore=tests/test_gpu_simulation.py tests
part gpu_tests_simulation 85 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o timeout=60 --durations=25 --junitxml="$OUT/gpu_tests_simulation.xml" tests/test_gpu_simulation.py
part bench_diffusion 18 "$PY" bench/diffusion.py --backend cupy --sizes 64 128 256 --out "$OUT"
part bench_agents 18 "$PY" bench/agents.py --backend cupy --sizes 1e3,1e4,1e5,1e6,1e7 --min-time 0.5 --out "$OUT"
part bench_step 38 "$PY" bench/step.py --backend cupy --seconds 2 --out "$OUT"
# the same step with the biology's host-read formulation and no field graph, for the ratio
part bench_step_baseline 15 "$PY" bench/step.py --backend cupy --seconds 2 --cases small 64:1e4 --host-paths --no-graph --tag _baseline --out "$OUT"
part bench_scaling 18 "$PY" bench/scaling.py --backend cupy --sides 64 128 256 --cells 1e4 1e5 1e6 --seconds 0.5 --out "$OUT"
part bench_syncs 22 "$PY" bench/syncs.py --steps 10 --out "$OUT"
echo "gpu-check finished with status $status${failed:+ (failed:$failed)}; results in $OUT" | tee -a "$OUT/status.txt"
exit $status
