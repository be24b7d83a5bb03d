"""How step time grows with the grid and with the number of cells: fitted log-log slopes.

Two series, measured in one run: voxels at a fixed number of cells (cubes of growing side), and
cells at a fixed grid. The slope of log(time per step) against log(size) is 1 for linear cost;
the smallest sizes sit in the launch/overhead-bound regime, so the slope is also fitted above
the first point (``slope_upper``).

    python bench/scaling.py                        # CPU defaults
    python bench/scaling.py --backend cupy         # GPU sizes
    python bench/scaling.py --sides 48 64 96 128 --cell-side 32 --cells 1e3 3e3 1e4 3e4 1e5
                                                   # CPU, both series past the fixed costs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import _cpu_model, run_case

from tissuesim.backend import select_backend


def slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    ap.add_argument("--sides", type=int, nargs="+", default=None, help="cube sides for the voxel series")
    ap.add_argument("--cells", type=float, nargs="+", default=None, help="cell counts for the cell series")
    ap.add_argument(
        "--cell-side",
        type=int,
        default=None,
        help="cube side of the cell series (default: the second of --sides)",
    )
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args(argv)
    be = select_backend(a.backend)
    sides = a.sides or ([64, 96, 128, 192, 256] if be.is_gpu else [24, 32, 48, 64])
    cells = a.cells or ([1e4, 1e5, 1e6, 3e6] if be.is_gpu else [1e3, 3e3, 1e4, 3e4])
    fixed_cells = int(cells[0])
    fixed_side = a.cell_side or sides[1]
    vox = [run_case(f"{s}:{fixed_cells}", a.backend, a.seconds, phases=False) for s in sides]
    cel = [run_case(f"{fixed_side}:{int(c)}", a.backend, a.seconds, phases=False) for c in cells]
    nv = [np.prod(r["shape"]) for r in vox]
    tv = [r["seconds_per_step"] for r in vox]
    nc = [r["n_cells"] for r in cel]
    tc = [r["seconds_per_step"] for r in cel]
    out = {
        "info": {"backend": be.name, "device": be.describe(), "cpu_model": _cpu_model()},
        "voxels": {
            "n": [int(v) for v in nv],
            "seconds_per_step": tv,
            "slope": slope(nv, tv),
            "slope_upper": slope(nv[1:], tv[1:]),
        },
        "cells": {
            "n": nc,
            "seconds_per_step": tc,
            "slope": slope(nc, tc),
            "slope_upper": slope(nc[1:], tc[1:]),
        },
    }
    for k in ("voxels", "cells"):
        s = out[k]
        rows = ", ".join(f"{n}: {t * 1e3:.2f} ms" for n, t in zip(s["n"], s["seconds_per_step"]))
        print(f"{k:>7}: {rows}  | slope {s['slope']:.2f} (above the first point {s['slope_upper']:.2f})")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"scaling_{'gpu' if be.is_gpu else 'cpu'}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
