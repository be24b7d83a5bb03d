"""The clinical course of each therapy in the systemic model (MODEL.md section 7; issue #6).

run_blood integrates the blood ODEs alone under the therapy schedule, so these checks cover
months to years in seconds. The same ODEs drive the full Simulation; tests/biology/
test_behaviour.py checks the tissue side and that coupling the patch leaves the course intact.
The model is deterministic, so a check either holds or not for the defaults; the margins say
how far from the boundary the defaults sit.
"""

from __future__ import annotations

import numpy as np
import pytest

import tissuesim
from tissuesim.biology.blood import run_blood


def course(*overrides, days=365.0):
    ts, events = run_blood(tissuesim.load_config(list(overrides)), days, dt_min=30.0)
    return ts, events


def first_day(ts, mask):
    i = np.flatnonzero(mask)
    return float(ts["time"][i[0]]) if i.size else None


def at(ts, col, day):
    return float(np.interp(day, ts["time"], ts[col]))


@pytest.fixture(scope="module")
def cd19():
    return course("therapy=cd19", days=730.0)[0]


def test_cd19_car_t_peak_in_blood_between_day_7_and_14(cd19):
    car = cd19["blood_cd19_car_t_per_ul"]
    peak_day = float(cd19["time"][np.argmax(car)])
    assert 7.0 <= peak_day <= 14.0, peak_day
    # lymphoma medians (ZUMA-1): 27.5/uL at day 7, 9.1 at day 14, 2.1 at day 28; autoimmune
    # patients have less antigen, so the peak is within the same order of magnitude
    assert 5.0 <= car.max() <= 150.0
    assert at(cd19, "blood_cd19_car_t_per_ul", 28) < 0.7 * car.max()


def test_cd19_depletes_blood_b_cells_within_14_days_and_they_return_after_3_to_5_months(cd19):
    b = cd19["blood_b_cell_per_ul"]
    dep = first_day(cd19, b < 0.05 * b[0])
    assert dep is not None and dep <= 14.0
    back = first_day(cd19, (b > 0.5 * b[0]) & (cd19["time"] > dep))
    assert back is not None and 80.0 <= back <= 160.0, back


def test_cd19_spares_long_lived_plasma_cells_and_autoantibody_falls_slowly(cd19):
    pc = cd19["blood_plasma_cell_per_ul"]
    assert at(cd19, "blood_plasma_cell_per_ul", 60) >= 0.7 * pc[0]
    ab = cd19["serum_autoantibody_rel"]
    # falls over months, not days: above half at day 14, about a quarter at 8 months
    # (anti-Jo-1 / 4 at 8 months, Pecher 2023)
    assert at(cd19, "serum_autoantibody_rel", 14) > 0.5
    assert 0.15 <= at(cd19, "serum_autoantibody_rel", 240) <= 0.35
    # lasting remission over two years: once below the remission threshold ab* = K^2 the
    # autoantibody stays there even though the autoreactive clone regrows (see blood.py)
    k = tissuesim.load_config(["therapy=cd19"]).biology.blood.disease_drive_half_rel
    late = cd19["time"] >= 150
    assert np.all(ab[late] < 0.8 * k * k), ab[late].max()
    assert cd19["relapse"].max() == 0


def test_bcma_removes_plasma_cells_and_halves_autoantibody_by_day_90():
    ts, _ = course("therapy=bcma", days=365.0)
    assert at(ts, "blood_plasma_cell_per_ul", 90) < 0.1 * ts["blood_plasma_cell_per_ul"][0]
    assert at(ts, "serum_autoantibody_rel", 90) < 0.5
    # B cells are not targets: they stay near baseline (lymphodepletion aside)
    assert at(ts, "blood_b_cell_per_ul", 90) > 0.8 * ts["blood_b_cell_per_ul"][0]
    # and the remission lasts: below the threshold the loop runs down
    assert at(ts, "serum_autoantibody_rel", 365) < at(ts, "serum_autoantibody_rel", 90)


def test_untreated_disease_persists_within_20_percent_for_180_days():
    ts, events = course("therapy=none", days=180.0)
    assert events == []
    for col in ("serum_autoantibody_rel", "blood_b_cell_per_ul", "blood_plasma_cell_per_ul"):
        rel = ts[col] / ts[col][0]
        assert np.all(np.abs(rel - 1) <= 0.2), col


def test_immunogenic_binder_loses_car_t_and_b_cells_return_earlier():
    def milestones(imm):
        ts, _ = course("therapy=cd19", f"therapy.binder_immunogenicity={imm}", days=730.0)
        t = ts["time"]
        car = ts["blood_cd19_car_t_per_ul"]
        b = ts["blood_b_cell_per_ul"]
        lost = first_day(ts, (car < 0.01) & (t > 14))
        back = first_day(ts, (b > 0.5 * b[0]) & (t > 14))
        return lost if lost is not None else np.inf, back, first_day(ts, ts["relapse"] > 0)

    weak, strong = milestones(0.1), milestones(0.8)
    assert strong[0] < weak[0] - 30, (weak, strong)  # CAR-T gone at least a month earlier
    assert strong[1] < weak[1] - 20, (weak, strong)  # B cells back at least 3 weeks earlier
    assert weak[2] is None and strong[2] is not None


def test_seed_case_relapses_after_about_nine_months_and_remits_after_bcma():
    ts, events = course("+experiment=antisynthetase_case", days=600.0)
    relapse = first_day(ts, ts["relapse"] > 0)
    assert relapse is not None and 180.0 <= relapse <= 365.0, relapse  # "after nine months"
    bcma = [e for e in events if e.what == "infuse_bcma_car_t"]
    assert len(bcma) == 1 and bcma[0].day == pytest.approx(relapse, abs=0.25)  # rows every 0.25 d
    assert "relapse detected" in bcma[0].detail
    day = bcma[0].day
    ab_relapse = at(ts, "serum_autoantibody_rel", day)
    # BCMA CAR-T expand although the CD19 product was rejected (another, fully human binder)
    assert ts["blood_bcma_car_t_per_ul"].max() > 5.0
    # remission: autoantibody below half its relapse level within 90 days and still falling
    assert at(ts, "serum_autoantibody_rel", day + 90) < 0.5 * ab_relapse
    assert at(ts, "serum_autoantibody_rel", 600) < at(ts, "serum_autoantibody_rel", day + 90)
    assert at(ts, "blood_plasma_cell_per_ul", day + 90) < 0.1 * ts["blood_plasma_cell_per_ul"][0]


def test_a_second_dose_of_the_rejected_product_fails_to_expand():
    """Seed patient: the CD19 product given again after the anti-CAR response did not expand."""
    first, _ = course("therapy=cd19", "therapy.binder_immunogenicity=0.8", days=14.0)
    ts, _ = course(
        "therapy=cd19",
        "therapy.binder_immunogenicity=0.8",
        "+therapy.infusions=[{product: cd19_car_t, day: 0.0}, {product: cd19_car_t, day: 280.0}]",
        days=300.0,
    )
    cfg = tissuesim.load_config(["therapy=cd19"]).biology.blood
    dose_in_blood = 1e6 * cfg.body_weight_kg / (cfg.blood_volume_l * 1e6) * cfg.infusion_circulating_fraction
    assert first["blood_cd19_car_t_per_ul"].max() > 3 * dose_in_blood  # the first dose expanded
    second = ts["blood_cd19_car_t_per_ul"][ts["time"] >= 280.0]
    assert second.max() <= dose_in_blood  # the second never rises above what was infused
    assert second[-1] < 0.01 * dose_in_blood  # and is cleared within three weeks


@pytest.mark.parametrize("therapy", ["cd19", "bcma", "dual"])
def test_higher_dose_gives_higher_il6_peak_and_crs_grade(therapy):
    def crs(dose_factor):
        ov = [f"therapy={therapy}", "therapy.crs_management=none"]
        cfg = tissuesim.load_config(ov)
        ov += [
            f"therapy.infusions.{i}.dose_per_kg={inf.dose_per_kg * dose_factor}"
            for i, inf in enumerate(cfg.therapy.infusions)
        ]
        ts, _ = course(*ov, days=30.0)
        return ts["serum_il6_pg_per_ml"].max(), ts["crs_grade"].max()

    (il6_lo, g_lo), (il6_hi, g_hi) = crs(1.0), crs(10.0)
    assert il6_hi > 1.5 * il6_lo
    assert g_hi > g_lo
    assert 1 <= g_lo <= 2  # grade 1 in most autoimmune patients, grade 2 rare (MODEL.md section 7)
