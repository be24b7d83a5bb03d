"""Benchmark of the agent step: neighbour build + contact query + move (with crowding, chemotaxis, walls).

Reports agent-steps per second against the number of cells N at fixed density (one cell per
(20 um)^3 in 3D, 10% closed voxels) and the log-log slope of time per step against N (1 = O(N)).
GPU times come from CUDA events around the timed steps.

    python bench/agents.py --backend numpy --sizes 1e3,1e4,1e5,1e6

It also times move() alone for a small 2D population (the default simulation's case: ~500 cells,
128 x 128 voxels, 8 cell types, 6 fields), where the fixed cost per call dominates
(``--small-cells 0`` skips it).
    python bench/agents.py --backend cupy  --sizes 1e3,1e4,1e5,1e6,1e7
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tissuesim.agents import MotilityParams, Population, build_cell_list, contacts, init_velocity, move
from tissuesim.backend import select_backend
from tissuesim.grid import Grid

SPACING_UM = 20.0
PARAMS = [
    MotilityParams(6.0, 3.0, "cxcl10", 300.0, 0.5, crowding_radius_um=4.0),
    MotilityParams(5.0, 2.0, "cxcl13", 200.0, 1.0, crowding_radius_um=4.0),
]


def setup(be, n: int, seed: int = 0):
    side = SPACING_UM * n ** (1.0 / 3.0)
    nv = max(4, math.ceil(side / 10.0))
    grid = Grid((nv, nv, nv), dx=10.0)
    rs = np.random.default_rng(seed)
    open_ = rs.random(grid.shape) > 0.1
    cand = np.flatnonzero(open_.reshape(-1))
    pick = cand[rs.integers(0, cand.size, n)]
    k, j, i = np.unravel_index(pick, grid.shape)
    pos = ((np.stack([i, j, k], 1) + rs.random((n, 3))) * grid.dx).astype(np.float32)
    pop = Population(be, capacity=n)
    pop.add(be.asarray(pos), be.asarray(rs.integers(0, 2, n).astype(np.uint8)))
    init_velocity(pop, PARAMS, 3, seed)
    x = grid.centres("x")
    f = np.broadcast_to(x / x.max(), grid.shape).astype(np.float32)
    # a FieldSet-like stack (nf, nz, ny, nx), as the simulation passes it: no copy per step
    # (C-contiguous: np.stack of these broadcast-derived arrays is not, and move would copy it)
    stack = np.ascontiguousarray(np.stack([f, f[:, :, ::-1]]))
    fields = SimpleNamespace(values=be.asarray(stack), names=["cxcl10", "cxcl13"])
    return grid, pop, be.asarray(open_), fields


def one_step(pop, grid, open_, fields, s, exact):
    cl = build_cell_list(pop, grid, 10.0)
    contacts(pop, 10.0, [0], [1], cell_list=cl, exact=exact)
    move(pop, grid, open_, 1.0, s, 7, PARAMS, fields=fields, cell_list=cl)


SMALL_PARAMS = [  # as conf/config.yaml's cell types: crowding everywhere, chemotaxis for some
    MotilityParams(5.0, 2.0, "cxcl13", 800.0, 1.0, crowding_radius_um=3.5),
    MotilityParams(1.0, 2.0, crowding_radius_um=4.0),
    MotilityParams(0.0, 3.0, crowding_radius_um=5.0),
    MotilityParams(7.0, 3.0, "cxcl10", 800.0, 1.0, crowding_radius_um=3.5),
    MotilityParams(7.0, 3.0, "cxcl10", 800.0, 1.0, crowding_radius_um=3.5),
    MotilityParams(7.0, 3.0, "cxcl10", 800.0, 1.0, crowding_radius_um=3.5),
    MotilityParams(3.0, 5.0, crowding_radius_um=6.0),
    MotilityParams(0.0, 3.0),
]


def setup_small(be, n: int = 500, seed: int = 0):
    """n cells on a 128 x 128 2D grid (dx 10 um, 5% closed), 8 types, 6 fields."""
    grid = Grid((1, 128, 128), dx=10.0)
    rs = np.random.default_rng(seed)
    open_ = rs.random(grid.shape) > 0.05
    cand = np.flatnonzero(open_.reshape(-1))
    pick = cand[rs.integers(0, cand.size, n)]
    _, j, i = np.unravel_index(pick, grid.shape)
    pos = np.zeros((n, 3), dtype=np.float32)
    pos[:, :2] = (np.stack([i, j], 1) + rs.random((n, 2))) * grid.dx
    pos[:, 2] = 0.5 * grid.dx
    pop = Population(be, capacity=1024)
    pop.add(be.asarray(pos), be.asarray(rs.integers(0, len(SMALL_PARAMS), n).astype(np.uint8)))
    init_velocity(pop, SMALL_PARAMS, 2, seed)
    names = ["cxcl13", "cxcl10", "ifng", "il6", "autoantibody", "damage"]
    vals = be.asarray(rs.random((len(names), *grid.shape)).astype(np.float32))
    return grid, pop, be.asarray(open_), SimpleNamespace(values=vals, names=names)


def time_small(be, n: int, min_time: float = 1.0) -> dict:
    """Seconds per move() call (cell list and crowding inside, as the simulation calls it)."""
    grid, pop, open_, fields = setup_small(be, n)
    for s in range(3):
        move(pop, grid, open_, 1.0, s, 7, SMALL_PARAMS, fields=fields)
    pop.check_flags()
    be.synchronize()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        for _ in range(50):
            move(pop, grid, open_, 1.0, 3 + steps, 7, SMALL_PARAMS, fields=fields)
            steps += 1
        be.synchronize()
    t = (time.perf_counter() - t0) / steps
    return {"n": n, "grid": list(grid.shape), "steps": steps, "seconds_per_move": t}


def time_size(be, n: int, min_time: float = 1.0) -> dict:
    grid, pop, open_, fields = setup(be, n)
    exact = not be.is_gpu  # GPU: the asynchronous pair buffer (no sync in the step)
    for s in range(2):  # warm-up: kernel compilation, pair-buffer sizing
        one_step(pop, grid, open_, fields, s, exact)
    pop.check_flags()
    one_step(pop, grid, open_, fields, 2, exact)
    pop.check_flags()
    steps, elapsed, cpu = 0, 0.0, 0.0
    batch = 1
    while elapsed < min_time:
        if be.is_gpu:
            xp = be.xp
            start, stop = xp.cuda.Event(), xp.cuda.Event()
            start.record()
            for _ in range(batch):
                one_step(pop, grid, open_, fields, 3 + steps, exact)
                steps += 1
            stop.record()
            stop.synchronize()
            elapsed += xp.cuda.get_elapsed_time(start, stop) / 1000.0
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(batch):
                one_step(pop, grid, open_, fields, 3 + steps, exact)
                steps += 1
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
        batch *= 2
    flags = pop.check_flags()
    t = elapsed / steps
    row = {
        "n": n,
        "grid": list(grid.shape),
        "steps": steps,
        "seconds_per_step": t,
        "agent_steps_per_s": n / t,
        "flags": flags,
    }
    if not be.is_gpu:
        # process CPU time: less sensitive than wall time to other jobs sharing the cores
        row["cpu_seconds_per_step"] = cpu / steps
        row["load_average_1min"] = os.getloadavg()[0]
    return row


def machine(be) -> dict:
    info = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": be.name,
        "device": be.describe(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    if be.is_gpu:
        info["cupy"] = be.xp.__version__
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"])
    ap.add_argument("--sizes", default=None, help="comma list of N (default 1e3..1e6, 1e7 on GPU)")
    ap.add_argument("--out", default="bench/results", help="folder for the JSON figures")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed steps per size")
    ap.add_argument(
        "--small-cells", type=int, default=500, help="cells of the small 2D move() case (0: skip)"
    )
    args = ap.parse_args(argv)
    be = select_backend(args.backend)
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    else:
        sizes = [10**k for k in range(3, 8 if be.is_gpu else 7)]
    rows = []
    print(f"agents benchmark on {be.describe()}: build + contacts + move per step, 3D, 1 cell / (20 um)^3")
    print(f"{'N':>10} {'ms/step':>10} {'agent-steps/s':>14} {'cpu ms/step':>12} {'load':>6}")
    for n in sizes:
        r = time_size(be, n, args.min_time)
        rows.append(r)
        cpu = (
            f"{1e3 * r['cpu_seconds_per_step']:>12.3f} {r['load_average_1min']:>6.2f}"
            if "cpu_seconds_per_step" in r
            else ""
        )
        print(f"{n:>10d} {1e3 * r['seconds_per_step']:>10.3f} {r['agent_steps_per_s']:>14.3e} {cpu}")
    slope = None
    if len(rows) >= 2:
        slope = float(
            np.polyfit(np.log([r["n"] for r in rows]), np.log([r["seconds_per_step"] for r in rows]), 1)[0]
        )
        big = [r for r in rows if r["n"] >= 10_000]
        print(f"log-log slope of time vs N: {slope:.3f} (all sizes)")
        if len(big) >= 2:
            s2 = float(
                np.polyfit(np.log([r["n"] for r in big]), np.log([r["seconds_per_step"] for r in big]), 1)[0]
            )
            print(f"log-log slope of time vs N: {s2:.3f} (N >= 1e4)")
    small = None
    if args.small_cells > 0:
        small = time_small(be, args.small_cells, args.min_time)
        print(
            f"small 2D case: {small['n']} cells on {small['grid'][1]} x {small['grid'][2]} voxels: "
            f"{1e3 * small['seconds_per_move']:.3f} ms per move()"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"agents_{'gpu' if be.is_gpu else 'cpu'}.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "agents",
                "step": "build_cell_list + contacts + move",
                "machine": machine(be),
                "results": rows,
                "loglog_slope": slope,
                "small_2d_move": small,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
