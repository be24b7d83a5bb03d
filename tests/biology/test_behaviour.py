"""Behaviour of the whole model in a tissue patch (MODEL.md section 7; issue #6), NumPy backend.

Each run is a full Simulation (tissue, fields, cells, blood), so these take minutes and are
marked slow; the systemic course over months to years is checked in seconds by
test_course.py, and these check the tissue side and that the patch does not change that course.
Patch cell counts are small Poisson numbers, so the tolerances are stated with their reason.
"""

from __future__ import annotations

import numpy as np
import pytest

import tissuesim
from tissuesim.biology.blood import run_blood

BASE = ["backend=numpy", "output.progress=false", "output.timeseries_every_days=0.25"]


def _sim(*overrides):
    return tissuesim.Simulation(tissuesim.load_config([*BASE, *overrides]))


def _table(sim):
    return {k: np.asarray(v, float) for k, v in sim.timeseries_table().items()}


def _run(*overrides):
    sim = _sim(*overrides)
    sim.run()
    return sim, _table(sim)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_cd19_depletes_tissue_b_cells_within_14_days_where_untreated_they_persist(seed):
    common = ["grid=tiny", f"seed={seed}", "duration_days=14"]
    cd19_sim, cd19 = _run(*common, "therapy=cd19")
    _, none = _run(*common, "therapy=none")
    b0 = cd19["count_b_cell"][0]
    assert b0 == none["count_b_cell"][0] and b0 >= 5
    # tissue: at most one B cell of the patch left at day 14 (CD19 CAR-T kill on contact and
    # blood no longer resupplies them); untreated, at least half of them remain (a Poisson
    # count of 5-10 cells rarely halves by chance within 14 days of ~5 d residence + arrivals)
    assert cd19["count_b_cell"][-1] <= 1
    assert none["count_b_cell"][-1] >= 0.5 * b0
    # CAR-T reach the patch from blood
    assert cd19["count_cd19_car_t"].max() >= 3
    # blood: depleted (< 5 % of baseline) within about a week (Mackensen 2022)
    dep = np.flatnonzero(cd19["blood_b_cell_per_ul"] < 0.05 * cd19["blood_b_cell_per_ul"][0])
    assert dep.size and cd19["time"][dep[0]] <= 8.0
    # CAR-T peak in days 7-14 (Mackensen 2022; Mueller 2024): the systemic model peaks on day
    # 7.5 (test_course.py) on a top flat within 8 % from day 5 to day 12. On the tiny grid each
    # CAR-T entering or leaving the patch moves 0.87 cells/uL of blood, a noise of a few
    # cells/uL that puts the maximum of the coupled curve anywhere on that top (days 5.3-13 over
    # seeds 0-3 when this was written; it is not a readout of the peak day at this grid). What
    # the coupled run must keep is the systemic course: the curve still at its top in days 7-14
    # (their maximum >= 0.9 of the whole maximum: a peak that had passed and waned before day 7
    # fails; 0.94-1.0 over seeds 0-3), and every value from day 3 within the patch's share of the
    # systemic one (the patch holds CAR-T that are not in blood: 0.49-1.0 of it over seeds 0-3).
    car, t = cd19["blood_cd19_car_t_per_ul"], cd19["time"]
    assert car[(t >= 7) & (t <= 14)].max() >= 0.9 * car.max()
    ref, _ = run_blood(cd19_sim.cfg, 14.0, dt_min=15.0, every_days=0.25)
    late = t >= 3
    ratio = car[late] / np.interp(
        t[late], np.asarray(ref["time"]), np.asarray(ref["blood_cd19_car_t_per_ul"])
    )
    assert 0.4 <= ratio.min() and ratio.max() <= 1.1


@pytest.mark.slow
def test_cd19_spares_tissue_plasma_cells_and_the_patch_leaves_the_systemic_course_intact():
    sim = _sim("grid=small", "seed=0", "therapy=cd19", "duration_days=60")
    pc = sim.cell_types.index("plasma_cell")
    n = sim.cells.n
    ids0 = set(sim.cells.id[:n][sim.cells.type[:n] == pc].tolist())
    assert len(ids0) >= 8
    sim.run()
    n = sim.cells.n
    alive = ids0 & set(sim.cells.id[:n][sim.cells.type[:n] == pc].tolist())
    # long-lived plasma cells are CD19-negative: only their ~730-day lifespan removes them
    # (expected 92 % left after 60 days; >= 70 % fails with < 2 % chance for 8-15 cells)
    assert len(alive) >= 0.7 * len(ids0), (len(alive), len(ids0))
    ts = _table(sim)
    # the serum course of the coupled run is the systemic model's within 2 % (the patch moves
    # a few cells per day between tissue and blood)
    ref, _ = run_blood(sim.cfg, 60.0, dt_min=15.0, every_days=1.0)
    for col, tol in (("serum_autoantibody_rel", 0.02), ("blood_plasma_cell_per_ul", 0.02)):
        assert ts[col][-1] == pytest.approx(ref[col][-1], rel=tol), col
    # CAR-T: the inflamed tissue the patch stands for holds CAR-T that are no longer in blood
    # (each patch CAR-T is 0.22 cells/uL on this grid), so the coupled blood peak is lower
    # (~20 % measured), never above the systemic one by more than the exits' noise
    car, car_ref = ts["blood_cd19_car_t_per_ul"], ref["blood_cd19_car_t_per_ul"]
    assert 0.6 * car_ref.max() <= car.max() <= 1.05 * car_ref.max()
    # autoantibody falls slowly: the long-lived plasma-cell share stays
    assert 0.3 < ts["serum_autoantibody_rel"][-1] < 0.6


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two 90-day runs, ~6 min on 2 idle cores
def test_bcma_kills_tissue_plasma_cells_and_halves_autoantibody_by_day_90():
    start = end = 0
    for seed in (0, 1):
        _, ts = _run("grid=tiny", f"seed={seed}", "therapy=bcma", "duration_days=90")
        pc0, pc90 = ts["count_plasma_cell"][0], ts["count_plasma_cell"][-1]
        assert pc0 >= 2
        # BCMA CAR-T home to the patch and kill sessile plasma cells there (under CD19 CAR-T
        # they stay: test above). A few CAR-T search a patch of 2-5 plasma cells at random, so
        # one may be missed: seed 1 keeps 1 of 3. Each seed loses some, the two together most.
        assert pc90 < pc0, (seed, pc0, pc90)
        assert ts["count_bcma_car_t"].max() >= 2
        start, end = start + pc0, end + pc90
        # systemic: plasma cells < 10 % and autoantibody < 50 % of baseline by day 90
        assert ts["serum_autoantibody_rel"][-1] < 0.5
        assert ts["blood_plasma_cell_per_ul"][-1] < 0.1 * ts["blood_plasma_cell_per_ul"][0]
    assert end <= 0.25 * start, (start, end)


@pytest.mark.slow
def test_untreated_disease_keeps_damage_and_autoantibody_within_20_percent_over_30_days():
    _, ts = _run("grid=tiny", "seed=0", "therapy=none", "duration_days=30")
    # the tissue's autoantibody field too: it rose from 0.4 to ~1.9 x serum within 10 days while
    # every tissue plasma cell's IgG counted as autoantibody and fibres filled with it
    for col in ("mean_damage", "serum_autoantibody_rel", "mean_autoantibody"):
        rel = ts[col] / ts[col][0]
        assert np.all(np.abs(rel - 1) <= 0.2), (col, rel.min(), rel.max())
    assert np.all(ts["crs_grade"] == 0) and np.all(ts["relapse"] == 0)
