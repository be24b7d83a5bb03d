"""Checkpoints: the full restartable state of a Simulation, inside snapshots.h5.

A checkpoint holds everything a step reads: the fields in their working dtype, every per-cell
array of the population (positions, velocities, ids, states, ages, counters), the clock (step
count; random numbers are counter-based, keyed by (seed, cell id, step, purpose), so the step
count *is* the random state), the therapy schedule (pending and applied events), and the state of
any component that offers ``state_dict()`` / ``load_state_dict()`` (e.g. the blood compartment).
Restoring it into a Simulation built from the same configuration continues the very same run:
bitwise on NumPy.

Layout (created with the file, appended like snapshots, SWMR-safe)::

    /checkpoint/time          float64 (n_ck,) days
    /checkpoint/step          int64 (n_ck,)
    /checkpoint/meta          uint8 ragged JSON, rows meta_offsets[k]:meta_offsets[k+1]
    /checkpoint/fields        (n_ck, nf, nz, ny, nx) working dtype
    /checkpoint/cells/<name>  ragged per-cell rows, rows cell_offsets[k]:cell_offsets[k+1]
    /checkpoint/extra/<name>  (n_ck, ...) arrays of components with state_dict()
"""

from __future__ import annotations

import json
import logging

import numpy as np


def checkpoint_spec(sim) -> dict:
    """{'fields': (dtype, shape), 'cells': {name: (dtype, trailing)}, 'extra': {name: (dtype, shape)}}."""
    cells = {
        name: (a.dtype.str, tuple(a.shape[1:])) for name, a in ((n, sim.cells[n]) for n in sim.cells.names)
    }
    extra = {k: (np.asarray(v).dtype.str, np.asarray(v).shape) for k, v in _extra_arrays(sim).items()}
    return {
        "fields": (sim.fields.values.dtype.str, tuple(sim.fields.values.shape)),
        "cells": cells,
        "extra": extra,
    }


def _components(sim) -> dict:
    """Named parts of the simulation that carry their own state (state_dict/load_state_dict)."""
    out = {}
    for name in ("blood", "biology"):
        obj = getattr(sim, name, None)
        if obj is not None and hasattr(obj, "state_dict"):
            out[name] = obj
    return out


def _extra_arrays(sim) -> dict[str, np.ndarray]:
    out = {"c_blood": sim.backend.asnumpy(sim.c_blood)}
    for cname, obj in _components(sim).items():
        for k, v in obj.state_dict().items():
            out[f"{cname}.{k}"] = sim.backend.asnumpy(v) if not isinstance(v, int | float) else np.asarray(v)
    return out


def capture(sim) -> tuple[dict[str, np.ndarray], dict]:
    """Host copies of the state: (arrays, meta). A sync point: call only at output time."""
    n = sim.cells.n
    arrays = {"fields": sim.backend.asnumpy(sim.fields.values).copy()}
    for name in sim.cells.names:
        arrays[f"cells/{name}"] = sim.backend.asnumpy(sim.cells[name][:n]).copy()
    for k, v in _extra_arrays(sim).items():
        arrays[f"extra/{k}"] = np.asarray(v).copy()
    meta = {
        "step": sim.step_count,
        "day": sim.day,
        "seed": sim.seed,
        "n_cells": n,
        "next_id": int(sim.cells.next_id),
        "pair_capacity": int(getattr(sim.cells, "pair_capacity", 0)),
        "pending_events": [[e.day, e.what, e.detail] for e in sim.pending_events],
        "event_log": [[e.day, e.what, e.detail] for e in sim.event_log],
        # highest CRS grade since the last timeseries row (the row reports the maximum between rows)
        "crs_max_since_row": float(getattr(sim, "_crs_max_since_row", 0)),
    }
    for cname, obj in _components(sim).items():
        if hasattr(obj, "meta_dict"):
            meta[f"meta.{cname}"] = obj.meta_dict()
    return arrays, meta


def restore(sim, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Put a captured state into ``sim`` (built from the same configuration)."""
    from tissuesim.biology.therapy import Event

    xp = sim.xp
    if meta["seed"] != sim.seed:
        raise ValueError(f"checkpoint seed {meta['seed']} != simulation seed {sim.seed}")
    f = arrays["fields"]
    if f.shape != tuple(sim.fields.values.shape) or f.dtype != sim.fields.values.dtype:
        raise ValueError(
            f"checkpoint fields {f.shape} {f.dtype} do not fit {sim.fields.values.shape} {sim.fields.values.dtype}"
        )
    sim.fields.values[...] = xp.asarray(f)
    n = int(meta["n_cells"])
    cells = sim.cells
    cells.reserve(n)
    for name in cells.names:
        buf = cells[name]
        buf[...] = cells._fill[name]
        key = f"cells/{name}"
        if key not in arrays:  # an attribute newer than the checkpoint: its registered fill
            logging.getLogger("tissuesim").warning(
                "checkpoint has no cell attribute %r (written by an older tissuesim); its cells get %r",
                name,
                cells._fill[name],
            )
            continue
        buf[:n] = xp.asarray(arrays[key])
    cells.n = n
    cells.next_id = int(meta["next_id"])
    if hasattr(cells, "pair_capacity"):
        cells.pair_capacity = int(meta.get("pair_capacity", 0))
    sim.c_blood[...] = xp.asarray(arrays["extra/c_blood"])
    for cname, obj in _components(sim).items():
        prefix = f"extra/{cname}."
        obj.load_state_dict({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        if hasattr(obj, "load_meta_dict") and f"meta.{cname}" in meta:
            obj.load_meta_dict(meta[f"meta.{cname}"])
    sim.step_count = int(meta["step"])
    if hasattr(sim, "_crs_max_since_row"):
        sim._crs_max_since_row = meta.get("crs_max_since_row", 0)
    sim.pending_events = [Event(float(d), w, t) for d, w, t in meta["pending_events"]]
    sim.event_log = [Event(float(d), w, t) for d, w, t in meta["event_log"]]
    sim.last_snapshot_step = sim.step_count
    if hasattr(sim.fields, "reset_budget"):
        sim.fields.reset_budget()


# ------------------------------------------------------------------------------------------------
# storage in snapshots.h5


def create_datasets(f, spec: dict) -> None:
    """Create the /checkpoint group of a new file (before SWMR mode is switched on)."""
    g = f.create_group("checkpoint")
    g.create_dataset("time", shape=(0,), maxshape=(None,), dtype="f8", chunks=(64,))
    g.create_dataset("step", shape=(0,), maxshape=(None,), dtype="i8", chunks=(64,))
    g.create_dataset("meta", shape=(0,), maxshape=(None,), dtype="u1", chunks=(65536,))
    for name in ("meta_offsets", "cell_offsets"):
        ds = g.create_dataset(name, shape=(1,), maxshape=(None,), dtype="i8", chunks=(64,))
        ds[0] = 0
    dt, shape = spec["fields"]
    g.create_dataset("fields", shape=(0, *shape), maxshape=(None, *shape), dtype=dt, chunks=(1, *shape))
    cg = g.create_group("cells")
    for name, (dt, trail) in spec["cells"].items():
        cg.create_dataset(name, shape=(0, *trail), maxshape=(None, *trail), dtype=dt, chunks=(16384, *trail))
    eg = g.create_group("extra")
    for name, (dt, shape) in spec["extra"].items():
        eg.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt)


def _append(ds, rows) -> None:
    n = ds.shape[0]
    ds.resize(n + rows.shape[0], axis=0)
    ds[n:] = rows


def write(f, day: float, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Append one checkpoint; /checkpoint/time is written last (it marks the checkpoint whole)."""
    g = f["checkpoint"]
    _append(g["fields"], arrays["fields"][None])
    n = None
    for name, ds in g["cells"].items():
        a = arrays[f"cells/{name}"]
        n = a.shape[0] if n is None else n
        _append(ds, a)
    off = g["cell_offsets"]
    _append(off, np.array([off[-1] + (n or 0)], dtype=np.int64))
    for name, ds in g["extra"].items():
        _append(ds, np.asarray(arrays[f"extra/{name}"])[None])
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _append(g["meta"], blob)
    moff = g["meta_offsets"]
    _append(moff, np.array([moff[-1] + blob.size], dtype=np.int64))
    _append(g["step"], np.array([meta["step"]], dtype=np.int64))
    _append(g["time"], np.array([day], dtype=np.float64))
    f.flush()


def read(f, index: int = -1) -> tuple[float, dict[str, np.ndarray], dict]:
    """(day, arrays, meta) of checkpoint ``index`` (default the last complete one)."""
    g = f["checkpoint"]
    for ds in (g["time"], g["meta_offsets"], g["cell_offsets"]):
        ds.refresh()
    n_ck = g["time"].shape[0]
    if n_ck == 0:
        raise LookupError(f"{f.filename} holds no checkpoint (set output.checkpoint_every_days > 0)")
    k = index % n_ck
    a, b = int(g["meta_offsets"][k]), int(g["meta_offsets"][k + 1])
    meta = json.loads(bytes(g["meta"][a:b]).decode())
    arrays = {"fields": g["fields"][k]}
    c0, c1 = int(g["cell_offsets"][k]), int(g["cell_offsets"][k + 1])
    for name, ds in g["cells"].items():
        arrays[f"cells/{name}"] = ds[c0:c1]
    for name, ds in g["extra"].items():
        arrays[f"extra/{name}"] = ds[k]
    return float(g["time"][k]), arrays, meta
