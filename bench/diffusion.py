"""Throughput of the field solvers: voxel-updates per second per solver, backend, size and field count.

One "voxel-update" is one field value advanced by one full step dt (all substeps, sweeps and the
reaction pass included). Beside each timing the same run times a plain copy of the stacked field
array (numpy copy on the CPU, device-to-device on the GPU), so ``x copy`` shows how many
memory-bandwidth-bound passes a step costs.

    python bench/diffusion.py --backend numpy                 # 64^3, 128^3
    python bench/diffusion.py --backend cupy                  # 64^3 .. 512^3
    python bench/diffusion.py --backend numpy --sizes 64 128 256 --fields 1 6

Writes JSON to --out (default bench/results) as diffusion_<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from tissuesim.backend import select_backend
from tissuesim.fields import FieldSet, FieldSpec, explicit_stable_dt
from tissuesim.grid import Grid

DX = 10.0  # um
D = 100.0  # um^2/min
DECAY = 0.02  # 1/min


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Timer:
    """Wall time of a callable repeated n times: cupy events on the GPU, perf_counter on the CPU."""

    def __init__(self, be):
        self.be = be

    def __call__(self, fn, n: int) -> float:
        fn()  # warm-up (kernel compilation, allocation of scratch)
        if self.be.is_gpu:
            cp = self.be.xp
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(n):
                fn()
            stop.record()
            stop.synchronize()
            return cp.cuda.get_elapsed_time(start, stop) / 1e3 / n
        best = float("inf")  # best of n: the CPU is shared, the minimum is the machine's speed
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best


def bench_case(be, n: int, n_fields: int, solver: str, dtype: str, reps: int) -> dict:
    grid = Grid((n, n, n), dx=DX)
    # explicit at its stable limit (1 substep); LOD at 10x that step (where it earns its keep).
    dt_lim = explicit_stable_dt(D, DX, 3)
    dt = dt_lim if solver == "explicit" else 10 * dt_lim
    specs = [FieldSpec(f"f{i}", D, decay_per_min=DECAY, solver=solver) for i in range(n_fields)]
    fs = FieldSet(be, grid, specs, dtype=dtype, dt=dt, track_budget=False)
    rng = np.random.default_rng(0)
    fs.values[...] = be.asarray(rng.random(fs.values.shape, dtype=np.float32).astype(dtype))
    timer = Timer(be)
    t_step = timer(fs.step, reps)
    dst = be.xp.empty_like(fs.values)

    def copy():
        be.xp.copyto(dst, fs.values)

    t_copy = timer(copy, max(reps, 5))
    nvox = n**3 * n_fields
    return {
        "solver": solver,
        "size": n,
        "fields": n_fields,
        "dtype": dtype,
        "dt_min": dt,
        "substeps": fs.plan(dt).substeps[specs[0].name],
        "seconds_per_step": t_step,
        "voxel_updates_per_s": nvox / t_step,
        "copy_seconds": t_copy,
        "copy_GB_per_s": 2 * fs.values.nbytes / t_copy / 1e9,
        "step_over_copy": t_step / t_copy,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="cube edges in voxels")
    ap.add_argument("--fields", type=int, nargs="+", default=[1, 6])
    ap.add_argument("--solvers", nargs="+", default=["explicit", "lod"], choices=("explicit", "lod"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--reps", type=int, default=None, help="steps timed per case")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    be = select_backend(args.backend)
    sizes = args.sizes or ([64, 128, 256, 512] if be.is_gpu else [64, 128])
    reps = args.reps or (20 if be.is_gpu else 3)
    info = {
        "backend": be.name,
        "device": be.describe(),
        "cpu_model": cpu_model(),
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "dx_um": DX,
        "D_um2_per_min": D,
        "decay_per_min": DECAY,
    }
    if be.is_gpu:
        import cupy

        info["cupy_version"] = cupy.__version__
        props = cupy.cuda.runtime.getDeviceProperties(be.device)
        name = props["name"]
        info["gpu_name"] = name.decode() if isinstance(name, bytes) else name
    rows = []
    print(f"# {info['device']} | {info['cpu_model']} | numpy {info['numpy_version']} | {args.dtype}")
    hdr = f"{'solver':9} {'size':>6} {'fields':>6} {'s/step':>10} {'Mvox-upd/s':>11} {'copy GB/s':>10} {'x copy':>8}"
    print(hdr)
    # Throw-away run first: the first large allocations of a process pay page faults (and glibc's
    # mmap threshold adapts), which would otherwise be charged to whichever case runs first.
    for solver in args.solvers:
        bench_case(be, min(sizes), 1, solver, args.dtype, 1)
    for solver in args.solvers:
        for n in sizes:
            for nf in args.fields:
                r = bench_case(be, n, nf, solver, args.dtype, reps)
                rows.append(r)
                print(
                    f"{solver:9} {n:>5}^3 {nf:>6} {r['seconds_per_step']:>10.4g} "
                    f"{r['voxel_updates_per_s'] / 1e6:>11.2f} {r['copy_GB_per_s']:>10.2f} {r['step_over_copy']:>8.1f}"
                )
    # LOD vs explicit per (size, fields): time of one LOD step over one explicit substep.
    ratios = []
    for r in rows:
        if r["solver"] != "lod":
            continue
        for e in rows:
            if e["solver"] == "explicit" and (e["size"], e["fields"]) == (r["size"], r["fields"]):
                ratios.append(
                    {
                        "size": r["size"],
                        "fields": r["fields"],
                        "lod_over_explicit": r["seconds_per_step"] / e["seconds_per_step"],
                    }
                )
    for q in ratios:
        print(f"lod/explicit step time  {q['size']:>4}^3 x{q['fields']}: {q['lod_over_explicit']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"diffusion_{'gpu' if be.is_gpu else 'cpu'}.json"
    path.write_text(json.dumps({"info": info, "results": rows, "lod_over_explicit": ratios}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
