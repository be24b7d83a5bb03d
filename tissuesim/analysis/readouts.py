"""Clinical readouts of summary.json, computed from a run's timeseries (DESIGN.md section 5).

Definitions (also in the README):

- CAR-T peak: the day and height of the maximum of blood CAR-T per uL (CD19 + BCMA products).
- B-cell depletion day: first day blood B cells fall below DEPLETION_FRACTION of baseline
  (the value at day 0).
- B-cell recovery day: first day after depletion that blood B cells climb back above
  RECOVERY_FRACTION of baseline.
- autoantibody_rel: serum autoantibody relative to baseline at days 30, 90, 180, 365 (the last
  row at or before that day; null when the run is shorter).
- relapse day: first day the simulation's relapse detector (timeseries column ``relapse``,
  0 or 1) is set.
- max CRS grade: maximum of the ``crs_grade`` column.
- final_damage_rel: mean damage at the end relative to day 0.

Every readout is null where its timeseries is absent or the event is not reached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

DEPLETION_FRACTION = 0.05
RECOVERY_FRACTION = 0.5
AUTOANTIBODY_DAYS = (30, 90, 180, 365)


def _f(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _first(mask: np.ndarray, t: np.ndarray) -> float | None:
    idx = np.flatnonzero(mask)
    return float(t[idx[0]]) if idx.size else None


def compute_readouts(ts: Mapping[str, np.ndarray]) -> dict:
    """Readouts from timeseries columns {'time': days (n,), name: (n,)}; see module docstring."""
    t = np.asarray(ts.get("time", []), dtype=float)
    out: dict = {
        "car_t_peak_day": None,
        "car_t_peak_blood_per_ul": None,
        "b_cell_depletion_day": None,
        "b_cell_recovery_day": None,
        "autoantibody_rel": {str(d): None for d in AUTOANTIBODY_DAYS},
        "max_crs_grade": None,
        "relapse_day": None,
        "final_damage_rel": None,
    }
    if t.size == 0:
        return out
    car = [
        np.asarray(ts[k], float) for k in ("blood_cd19_car_t_per_ul", "blood_bcma_car_t_per_ul") if k in ts
    ]
    if car:
        total = np.sum(car, axis=0)
        if np.any(total > 0):
            i = int(np.nanargmax(total))
            out["car_t_peak_day"] = float(t[i])
            out["car_t_peak_blood_per_ul"] = _f(total[i])
    dep = None
    if "blood_b_cell_per_ul" in ts:
        b = np.asarray(ts["blood_b_cell_per_ul"], float)
        if b[0] > 0:
            dep = _first(b < DEPLETION_FRACTION * b[0], t)
            out["b_cell_depletion_day"] = dep
            if dep is not None:
                after = t > dep
                out["b_cell_recovery_day"] = _first(after & (b > RECOVERY_FRACTION * b[0]), t)
    if "serum_autoantibody_rel" in ts:
        a = np.asarray(ts["serum_autoantibody_rel"], float)
        for d in AUTOANTIBODY_DAYS:
            idx = np.flatnonzero(t <= d + 1e-9)
            if t[-1] >= d - 1e-9 and idx.size:
                out["autoantibody_rel"][str(d)] = _f(a[idx[-1]])
    if "relapse" in ts:
        out["relapse_day"] = _first(np.asarray(ts["relapse"], float) > 0, t)
    if "crs_grade" in ts:
        out["max_crs_grade"] = _f(np.nanmax(ts["crs_grade"]))
    if "mean_damage" in ts:
        d = np.asarray(ts["mean_damage"], float)
        if d[0] > 0:
            out["final_damage_rel"] = _f(d[-1] / d[0])
    return out
