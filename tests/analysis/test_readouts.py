"""Clinical readouts from timeseries, against hand-made curves with known answers."""

from __future__ import annotations

import numpy as np

from tissuesim.analysis.readouts import compute_readouts


def test_readouts_of_a_known_course():
    t = np.arange(0, 400, 1.0)
    car = 30 * np.exp(-0.5 * ((t - 9) / 3) ** 2)  # peak 30/uL at day 9
    b = np.where(t < 5, 100.0, np.where(t < 120, 1.0, 100.0))  # gone day 5, back day 120
    aab = np.exp(-t / 200)
    crs = np.where((t > 2) & (t < 6), 1.0, 0.0)
    dmg = np.linspace(1.0, 0.25, t.size)
    relapse = (t >= 270).astype(float)
    r = compute_readouts(
        {
            "time": t,
            "blood_cd19_car_t_per_ul": car,
            "blood_b_cell_per_ul": b,
            "serum_autoantibody_rel": aab,
            "crs_grade": crs,
            "mean_damage": dmg,
            "relapse": relapse,
        }
    )
    assert r["car_t_peak_day"] == 9.0 and abs(r["car_t_peak_blood_per_ul"] - 30) < 1e-9
    assert r["b_cell_depletion_day"] == 5.0
    assert r["b_cell_recovery_day"] == 120.0
    assert abs(r["autoantibody_rel"]["90"] - np.exp(-90 / 200)) < 1e-12
    assert abs(r["autoantibody_rel"]["365"] - np.exp(-365 / 200)) < 1e-12
    assert r["max_crs_grade"] == 1.0
    assert r["relapse_day"] == 270.0
    assert abs(r["final_damage_rel"] - 0.25) < 1e-12


def test_readouts_null_where_not_reached():
    t = np.arange(0, 20, 0.5)
    r = compute_readouts({"time": t, "blood_b_cell_per_ul": np.full(t.size, 50.0)})
    assert r["b_cell_depletion_day"] is None and r["b_cell_recovery_day"] is None
    assert r["car_t_peak_day"] is None
    assert all(v is None for v in r["autoantibody_rel"].values())
    assert r["max_crs_grade"] is None and r["relapse_day"] is None
