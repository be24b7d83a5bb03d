"""End-to-end step benchmark: steps per second of the whole Simulation, and where the time goes.

For each case (a grid preset, or a synthetic cube with a set number of cells) the script builds
the Simulation, warms up, then times ``sim.step()`` and, in the same run, each phase of the step
(the Simulation methods listed in PHASES, each wrapped with a timer; on the GPU the wrapper
synchronises the device so the time lands on the phase that spent it). Output: a table and
JSON (bench/results/step_<cpu|gpu>.json) with steps/s, cost per voxel and per cell, the phase
breakdown, and the machine.

    python bench/step.py                          # CPU: tiny, small, 64^3 + 1e4 cells
    python bench/step.py --cases 64:1e4 128:1e5   # synthetic cubes: side:cells
    python bench/step.py --backend cupy           # GPU: small, 64^3+1e4 ... 256^3+1e6

On NumPy the grid presets also get ``python_overhead``: the share of the step spent in Python
outside NumPy's compiled loops (interpreter, call dispatch, small-array setup), estimated by
scaling the problem down. The preset runs at 100%, 75% and 50% of its side (same tissue recipe,
so voxels and cells both scale with the area); the step time is fitted as
t = overhead + slope * voxels, and the intercept, the part that does not grow with the arrays,
is the overhead. Fraction = intercept / t(preset). Issue #8 asks for <= 0.30 on tiny and small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import tissuesim
from tissuesim.backend import select_backend

# Phases of Simulation.step: name -> (owner, method). "arrivals" is Immunology.before_move less
# the blood ODE inside it (on the GPU "blood" is DeviceBlood.advance, which takes up the result
# the blood kernel left at the end of the previous step: the kernel itself runs in "biology");
# "biology" is after_move (contacts, kills, fates, exits, field sources); "rest" is what the step
# spends outside the listed phases. Output (timeseries rows, snapshot copies) happens between
# steps and is timed per call, then spread over the steps of the default intervals.
PHASES = {
    "events": ("sim", "_apply_events"),
    "blood": ("blood", "advance"),
    "arrivals": ("immunology", "before_move"),
    "agents": ("sim", "_move_cells"),
    "biology": ("immunology", "after_move"),
    "fields": ("fields", "step"),
}
CPU_CASES = ("tiny", "small", "64:1e4")
GPU_CASES = ("small", "64:1e4", "128:1e5", "256:1e6")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build(case: str, backend: str, extra=()):
    """A Simulation for a grid preset name or 'side:cells' (3D cube of side voxels, muscle)."""
    over = [f"backend={backend}", "output.progress=false", "duration_days=1000", "seed=0", *extra]
    if ":" in case:
        side, cells = case.split(":")
        side, cells = int(side), int(float(cells))
        over += ["grid=medium", f"grid.nx={side}", f"grid.ny={side}", f"grid.nz={side}"]
    else:
        cells = None
        over += [f"grid={case}"]
    sim = tissuesim.Simulation(tissuesim.load_config(over))
    if cells is not None and sim.cells.n < cells:
        # top up with randomly placed cells of every type in open voxels
        be = sim.backend
        rs = np.random.default_rng(1)
        open_idx = np.flatnonzero(sim.tissue.open_mask().reshape(-1))
        m = cells - sim.cells.n
        pick = open_idx[rs.integers(0, open_idx.size, m)]
        k, j, i = np.unravel_index(pick, sim.grid.shape)
        pos = ((np.stack([i, j, k], 1) + rs.random((m, 3))) * sim.grid.dx).astype(np.float32)
        types = rs.integers(0, len(sim.cell_types), m).astype(np.uint8)
        sim.cells.add(be.asarray(pos), be.asarray(types))
    return sim


def phase_target(sim, name):
    """(object, method name) of a phase in this simulation (None where it has none)."""
    owner, attr = PHASES[name]
    if name == "blood" and getattr(sim.immunology, "blood_on_device", False):
        return sim.immunology.device_blood(), attr
    obj = sim if owner == "sim" else getattr(sim, owner, None)
    return (obj, attr) if obj is not None and getattr(obj, attr, None) is not None else (None, attr)


def _wrap(sim, name, totals, sync):
    obj, attr = phase_target(sim, name)
    if obj is None:
        return False
    fn = getattr(obj, attr)

    def timed(*a, **k):
        sync()
        t = time.perf_counter()
        out = fn(*a, **k)
        sync()
        totals[name] += time.perf_counter() - t
        return out

    setattr(obj, attr, timed)
    return True


def _output_cost(sim, calls: int = 5) -> dict:
    """Seconds per timeseries row, per synchronous snapshot copy (device -> host) and per
    snapshot as a run takes it (snapshot_submit: what the step loop waits for), and per step
    when spread over the default output intervals (rows every 0.25 d, snapshots every day)."""
    be = sim.backend
    out = {}
    for name, fn in (("timeseries_row", sim.record_timeseries), ("snapshot_copy", sim.snapshot)):
        be.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        be.synchronize()
        out[name] = (time.perf_counter() - t) / calls

    # what a run's loop is held for by one snapshot: on CuPy the staging copies and the queued
    # download (tissuesim.io.staging; the download and the write overlap later steps), on NumPy
    # the copy and the write
    class _NullWriter:
        def write_snapshot(self, day, fields, agents):
            pass

    w = _NullWriter()
    sim._submit_snapshot(w)  # first call: makes the stager and its buffers
    held = 0.0
    for _ in range(calls):
        sim.flush_snapshots()
        be.synchronize()
        t = time.perf_counter()
        sim._submit_snapshot(w)
        held += time.perf_counter() - t
    sim.flush_snapshots()
    out["snapshot_submit"] = held / calls
    steps_row = 0.25 * 1440 / sim.dt_min
    steps_snap = 1.0 * 1440 / sim.dt_min
    out["per_step_at_default_intervals"] = (
        out["timeseries_row"] / steps_row + out["snapshot_submit"] / steps_snap
    )
    return out


def _allocation(sim, steps: int = 20) -> dict:
    """NumPy: the largest transient allocation of a step (tracemalloc peak above the memory held
    before the step), against the bytes of the state (fields and cell arrays)."""
    import tracemalloc

    state = sim.fields.values.nbytes + sum(sim.cells[k].nbytes for k in sim.cells.names)
    tracemalloc.start()
    worst = 0
    for _ in range(steps):
        tracemalloc.reset_peak()
        held, _ = tracemalloc.get_traced_memory()
        sim.step()
        _, peak = tracemalloc.get_traced_memory()
        worst = max(worst, peak - held)
    tracemalloc.stop()
    return {"peak_transient_bytes": worst, "state_bytes": state, "ratio": worst / state}


def _state_copy(sim, per_step: float) -> dict:
    """A plain copy of the state (fields and every cell array) into kept buffers, timed in the
    same run as the step: the step's cost in copies of the data it works on."""
    be = sim.backend
    xp = sim.xp
    src = [sim.fields.values] + [sim.cells[k] for k in sim.cells.names]
    dst = [xp.empty_like(a) for a in src]

    def copy():
        for d, a in zip(dst, src):
            xp.copyto(d, a)

    copy()
    be.synchronize()
    best = float("inf")
    for _ in range(5):
        reps = 0
        t0 = time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 0.05:
            copy()
            reps += 1
        be.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    nbytes = sum(a.nbytes for a in src)
    return {
        "seconds": best,
        "bytes": nbytes,
        "GB_per_s": 2 * nbytes / best / 1e9,
        "step_over_copy": per_step / best,
    }


def _time_steps(sim, seconds: float) -> float:
    """Seconds per step of sim.step() (best of three rounds of about seconds / 3 each)."""
    for _ in range(20):
        sim.step()
    sim.backend.synchronize()
    best = float("inf")
    for _ in range(3):
        n = 0
        t0 = time.perf_counter()
        while n < 10 or time.perf_counter() - t0 < seconds / 3:
            sim.step()
            n += 1
        sim.backend.synchronize()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


OVERHEAD_SCALES = (1.0, 0.75, 0.5)


def python_overhead(case: str, backend: str, seconds: float) -> dict:
    """Share of a preset's step spent outside NumPy's compiled loops (see the module docstring)."""
    base = build(case, backend)
    _nz, ny, nx = base.grid.shape
    del base
    pts = []
    for f in OVERHEAD_SCALES:
        sx, sy = max(8, round(nx * f)), max(8, round(ny * f))
        sim = build(case, backend, [f"grid.nx={sx}", f"grid.ny={sy}"])
        pts.append((sim.grid.n_voxels, int(sim.cells.n), _time_steps(sim, seconds)))
        del sim
    v = np.array([p[0] for p in pts], dtype=float)
    t = np.array([p[2] for p in pts])
    _slope, intercept = np.polyfit(v, t, 1)
    intercept = float(min(max(intercept, 0.0), t[0]))
    return {
        "fraction": intercept / float(t[0]),
        "overhead_seconds_per_step": intercept,
        "method": (
            "step time at 100/75/50% of the preset's side (voxels and cells scale with the area) "
            "fitted as t = overhead + slope * voxels; fraction = overhead / t(100%): the share of "
            "the step that does not grow with the arrays (Python, NumPy call dispatch, setup)"
        ),
        "points": [{"voxels": int(a), "cells": c, "seconds_per_step": b} for a, c, b in pts],
    }


#: switches for side-by-side runs of the older step formulations (set by main's flags)
VARIANT = {"host_paths": False, "no_graph": False}


def run_case(case: str, backend: str, seconds: float, phases: bool = True) -> dict:
    """Steps per second of one case; with ``phases`` also the phase breakdown and output cost."""
    sim = build(case, backend)
    if VARIANT["host_paths"]:  # the older step: host reads in the biology, blood ODE on the host
        sim.immunology.device_paths = False
        sim.immunology.blood_on_device = False
    if VARIANT["no_graph"]:
        sim.fields.use_graph = False
    be = sim.backend
    for _ in range(3):
        sim.step()
    be.synchronize()
    # whole steps, no phase timers (no extra syncs)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sim.step()
        n += 1
    be.synchronize()
    per_step = (time.perf_counter() - t0) / n
    base = {
        "case": case,
        "shape": list(sim.grid.shape),
        "n_fields": len(sim.fields.names),
        "n_cells": int(sim.cells.n),
        "steps_timed": n,
        "seconds_per_step": per_step,
        "steps_per_second": 1.0 / per_step,
        "ns_per_voxel_field": per_step / (sim.grid.n_voxels * len(sim.fields.names)) * 1e9,
        "ns_per_cell": per_step / max(sim.cells.n, 1) * 1e9,
        # GPU: steps whose blood advance needed a read of its own (expected: the first only)
        "blood_on_device": bool(sim.immunology.blood_on_device),
        "blood_extra_reads": int(sim.immunology.blood_extra_reads),
    }
    base["state_copy"] = _state_copy(sim, per_step)
    if not be.is_gpu:
        base["allocation"] = _allocation(sim)
    if not phases:
        return base
    # the same again with phase timers
    totals = dict.fromkeys(PHASES, 0.0)
    present = [p for p in PHASES if _wrap(sim, p, totals, be.synchronize)]
    m = max(3, min(n, 200))
    t0 = time.perf_counter()
    for _ in range(m):
        sim.step()
    be.synchronize()
    timed_step = (time.perf_counter() - t0) / m
    phases = {p: totals[p] / m for p in present}
    if "arrivals" in phases and "blood" in phases:
        phases["arrivals"] -= phases["blood"]  # the blood ODE runs inside before_move
    phases["rest"] = max(timed_step - sum(phases.values()), 0.0)
    return {**base, "phase_seconds_per_step": phases, "output_seconds": _output_cost(sim)}


def _is_preset(case: str) -> bool:
    return ":" not in case


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    ap.add_argument("--cases", nargs="+", default=None, help="grid presets or side:cells")
    ap.add_argument("--seconds", type=float, default=3.0, help="time spent per case (default 3)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--no-overhead", action="store_true", help="skip the Python-overhead estimate")
    ap.add_argument(
        "--host-paths",
        action="store_true",
        help="GPU: the biology's host-read formulation and the blood ODE on the host (the older step)",
    )
    ap.add_argument(
        "--no-graph", action="store_true", help="GPU: field step by plain launches, no CUDA graph"
    )
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (step_gpu<tag>.json)")
    a = ap.parse_args(argv)
    VARIANT["host_paths"], VARIANT["no_graph"] = a.host_paths, a.no_graph
    be = select_backend(a.backend)
    cases = a.cases or (GPU_CASES if be.is_gpu else CPU_CASES)
    results = []
    print(f"# {be.describe()} | {_cpu_model()} | numpy {np.__version__}")
    print(
        f"{'case':>10} {'shape':>16} {'cells':>8} {'steps/s':>9} {'ns/vox-fld':>10} {'ns/cell':>8}  phases (ms)"
    )
    info = {
        "backend": be.name,
        "device": be.describe(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy_version": np.__version__,
        "tissuesim_version": tissuesim.__version__,
        "python_overhead_method": (
            "NumPy presets only: intercept of step time vs voxels over 100/75/50% of the preset's "
            "side, divided by the preset's step time (the size-independent share of the step: "
            "Python and NumPy call dispatch outside the compiled loops)"
        ),
    }
    if be.is_gpu:
        import cupy

        info["cupy_version"] = cupy.__version__
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"step_{'gpu' if be.is_gpu else 'cpu'}{a.tag}.json"
    info["variant"] = dict(VARIANT)
    for case in cases:
        r = run_case(case, a.backend, a.seconds)
        if not be.is_gpu and _is_preset(case) and not a.no_overhead:
            r["python_overhead"] = python_overhead(case, a.backend, a.seconds)
        results.append(r)
        ph = " ".join(
            f"{k.strip('_').split('.')[0]}={v * 1e3:.2f}" for k, v in r["phase_seconds_per_step"].items()
        )
        print(
            f"{case:>10} {'x'.join(map(str, r['shape'])):>16} {r['n_cells']:>8} {r['steps_per_second']:>9.1f} "
            f"{r['ns_per_voxel_field']:>10.2f} {r['ns_per_cell']:>8.0f}  {ph}"
        )
        sc = r["state_copy"]
        print(
            f"{'':>10} step = {sc['step_over_copy']:.0f} copies of the state "
            f"({sc['bytes'] / 1e6:.2f} MB copied at {sc['GB_per_s']:.1f} GB/s in this run)"
        )
        if "allocation" in r:
            al = r["allocation"]
            print(
                f"{'':>10} largest transient allocation in a step: {al['peak_transient_bytes'] / 1e6:.2f} MB "
                f"= {al['ratio']:.2f} x the state ({al['state_bytes'] / 1e6:.2f} MB)"
            )
        if "python_overhead" in r:
            po = r["python_overhead"]
            print(
                f"{'':>10} python overhead {po['fraction']:.0%} of the step "
                f"({po['overhead_seconds_per_step'] * 1e3:.2f} ms, fit over {len(po['points'])} sizes)"
            )
        # written after every case, so a run cut short keeps what it measured
        path.write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
