"""Exporters to the tools researchers already use: pandas tables of cells, xarray of fields.

pandas and xarray are optional (``pip install -e ".[analysis]"``); they are imported on call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tissuesim.io.hdf5 import RunReader, open_run


def _reader(run) -> tuple[RunReader, bool]:
    if isinstance(run, RunReader):
        return run, False
    return open_run(run), True


def cells_dataframe(run, index: int | None = None, day: float | None = None):
    """Cells of one snapshot as a pandas DataFrame.

    run : a run directory, its snapshots.h5, or an open RunReader.
    Columns: time_days, id, type (categorical cell type names), x_um, y_um, z_um, then every
    other per-cell dataset of the file (state, age_min, ...).
    """
    import pandas as pd

    r, close = _reader(run)
    try:
        k = r._index(index, day)
        a = r.agents(k)
        pos = a.pop("position")
        types = a.pop("type")
        ids = a.pop("id")
        df = pd.DataFrame(
            {
                "time_days": np.full(len(ids), r.times[k]),
                "id": ids,
                "type": pd.Categorical.from_codes(types.astype(np.int64), categories=r.cell_types),
                "x_um": pos[:, 0],
                "y_um": pos[:, 1],
                "z_um": pos[:, 2],
            }
        )
        for name, v in a.items():
            df[name] = v
        return df
    finally:
        if close:
            r.close()


def cells_csv(run, out_dir: str | Path) -> list[Path]:
    """One CSV per snapshot (cells_<k>.csv) in out_dir; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r, close = _reader(run)
    try:
        paths = []
        for k in range(len(r.times)):
            p = out_dir / f"cells_{k:04d}.csv"
            cells_dataframe(r, k).to_csv(p, index=False)
            paths.append(p)
        return paths
    finally:
        if close:
            r.close()


def fields_xarray(run, names: list[str] | None = None):
    """Every snapshot of the fields as an xarray.Dataset.

    Variables: one per field, dims (time, z, y, x), float32, attrs units/long_name/diffusion/decay.
    Coordinates: time in days, z/y/x at voxel centres in um (origin at the outer corner of voxel
    0, as in the XDMF file). The arrays are read into memory.
    """
    import xarray as xr

    r, close = _reader(run)
    try:
        nz, ny, nx = r.shape
        dx = float(r.attrs["dx_um"])
        coords = {
            "time": ("time", r.times, {"units": "days"}),
            "z": ("z", (np.arange(nz) + 0.5) * dx, {"units": "um"}),
            "y": ("y", (np.arange(ny) + 0.5) * dx, {"units": "um"}),
            "x": ("x", (np.arange(nx) + 0.5) * dx, {"units": "um"}),
        }
        n = len(r.times)
        data = {}
        for name in names or r.field_names:
            ds = r.f["fields"][name]
            ds.refresh()
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in ds.attrs.items()}
            data[name] = (("time", "z", "y", "x"), ds[:n], attrs)
        attrs = {
            k: v
            for k, v in r.attrs.items()
            if k in ("tissuesim_version", "seed", "backend", "dx_um", "dt_min")
        }
        return xr.Dataset(data, coords=coords, attrs=attrs)
    finally:
        if close:
            r.close()
