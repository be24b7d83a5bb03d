"""Benchmark: time to generate each tissue on 2D and 3D grids.

Usage: python bench/tissue.py [--out DIR] [--repeat N] [--quick]
Prints one line per (tissue, grid) and writes DIR/tissue.json (default bench/results/tissue.json).
Times are wall seconds of ``build_tissue`` (geometry + initial cells + initial fields), best of N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from tissuesim.grid import Grid
from tissuesim.tissue import TISSUE_SCHEMAS, build_tissue
from tissuesim.tissue.measure import unreachable_open_voxels

GRIDS = {
    "2d_256x256": (1, 256, 256),
    "3d_medium_48x96x96": (48, 96, 96),
    "3d_128x128x128": (128, 128, 128),
    "3d_50x200x200": (50, 200, 200),
    "3d_large_128x256x256": (128, 256, 256),
}
QUICK = ("2d_256x256", "3d_medium_48x96x96")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the best is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dx", type=float, default=10.0, help="voxel edge, um")
    ap.add_argument("--quick", action="store_true", help="only the small grids")
    args = ap.parse_args(argv)

    rows = []
    for gname, shape in GRIDS.items():
        if args.quick and gname not in QUICK:
            continue
        grid = Grid(shape, args.dx)
        for tname in ("muscle", "lung", "joint"):
            best = float("inf")
            for _ in range(max(1, args.repeat)):
                t0 = time.perf_counter()
                tissue = build_tissue(TISSUE_SCHEMAS[tname](), grid, args.seed)
                best = min(best, time.perf_counter() - t0)
            row = {
                "tissue": tname,
                "grid": gname,
                "shape": list(shape),
                "dx_um": args.dx,
                "n_voxels": grid.n_voxels,
                "seconds": round(best, 4),
                "mvoxels_per_s": round(grid.n_voxels / best / 1e6, 3),
                "volume_fractions": {k: round(v, 4) for k, v in tissue.volume_fractions().items()},
                "initial_cells": {k: len(v) for k, v in tissue.initial_cells.items()},
                "unreachable_open_voxels": unreachable_open_voxels(tissue),
            }
            rows.append(row)
            print(f"{tname:7s} {gname:22s} {best:8.3f} s  {row['mvoxels_per_s']:7.2f} Mvox/s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "benchmark": "tissue generation (build_tissue, NumPy/scipy on the host)",
        "machine": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "seed": args.seed,
        "repeat": args.repeat,
        "results": rows,
    }
    (out / "tissue.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out / 'tissue.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
