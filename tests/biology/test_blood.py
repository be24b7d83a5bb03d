"""Blood ODEs against analytic solutions, CRS thresholds, therapy events, patch scaling."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import tissuesim
from tissuesim.biology.blood import Blood, crs_grade, run_blood
from tissuesim.biology.immunology import plain

CFG = tissuesim.load_config(["grid=tiny", "backend=numpy", "output.progress=false"])
BLOOD = plain(CFG.biology.blood)
THERAPY = plain(CFG.therapy)


def _blood(**over):
    return Blood(dataclasses.replace(BLOOD, **over), {"cd19_car_t": "NO_SUCH_ANTIGEN"}, None)


def _run(b, days, dt_min=10.0):
    """Advance exactly ``days`` in steps of about dt_min minutes."""
    n = max(1, round(days * 1440 / dt_min))
    for _ in range(n):
        b.advance(days * 1440 / n)


def test_effector_car_t_decay_with_their_half_life_without_antigen():
    b = _blood(memory_fraction=0.0)
    b.infuse("cd19_car_t", 1e6)
    e0 = b.car_t_per_ul("cd19_car_t")
    assert e0 == pytest.approx(1e6 * 70 / 5e6 * BLOOD.infusion_circulating_fraction)
    _run(b, BLOOD.effector_half_life_days)
    assert b.car_t_per_ul("cd19_car_t") / e0 == pytest.approx(0.5, rel=1e-7)


def test_memory_fraction_follows_the_two_exponential_solution():
    b = _blood()
    b.infuse("cd19_car_t", 1e6)
    e0 = b.y["E_cd19_car_t"]
    de, dm, mu = math.log(2) / 4.3, math.log(2) / 220.0, BLOOD.memory_fraction
    t = 30.0
    _run(b, t)
    m = mu * de * e0 * (math.exp(-dm * t) - math.exp(-de * t)) / (de - dm)
    assert b.y["M_cd19_car_t"] == pytest.approx(m, rel=1e-6)
    # long after: about memory_fraction of the dose remains (Stein 2019: ~0.8 %)
    assert b.y["M_cd19_car_t"] / e0 == pytest.approx(mu, rel=0.15)


def test_autoantibody_decays_with_igg_half_life_without_its_sources():
    b = _blood()
    b.y.update(b_auto=0.0, pb=0.0, pc=0.0, ab=2.0)  # no secreting cells: pure IgG clearance
    _run(b, 21.0, dt_min=60.0)
    assert b.y["ab"] == pytest.approx(1.0, rel=1e-6)


def test_disease_drive_is_one_at_baseline_and_its_threshold_is_k_squared():
    b = _blood()
    k = BLOOD.disease_drive_half_rel
    assert b.disease_drive(1.0) == pytest.approx(1.0, rel=1e-12)
    assert b.disease_drive(0.0) == 0.0
    # h = 2: the fixed points of ab = D(ab) are 1 and K^2 (module docstring)
    assert BLOOD.disease_drive_hill == 2.0
    assert b.remission_threshold() == pytest.approx(k * k, rel=1e-9)
    # another Hill exponent: the root found is a fixed point strictly between 0 and 1
    b3 = _blood(disease_drive_hill=3.0, disease_drive_half_rel=0.7)
    t3 = b3.remission_threshold()
    assert 0 < t3 < 1 and b3.disease_drive(t3) == pytest.approx(t3, rel=1e-9)


@pytest.mark.parametrize("side", [-1, 1])
def test_the_autoimmune_loop_is_bistable_about_its_threshold(side):
    """With B cells at baseline and every pool on its steady state for a given autoantibody
    level, a level 10 % below the threshold runs down to remission and 10 % above returns to the
    disease state: the property that makes lasting remission possible with B cells back."""
    b = _blood()
    ab = b.remission_threshold() * (1 + 0.1 * side)
    d = b.disease_drive(ab)
    b.y.update(ab=ab, pb=BLOOD.plasmablast_per_ul * d, pc=BLOOD.plasma_cell_per_ul * d)
    _run(b, 6 * 365.0, dt_min=360.0)  # the way back is slow: plasma cells live ~2 years
    if side < 0:
        assert b.y["ab"] < 0.5 * ab
    else:
        assert b.y["ab"] > 0.9


def test_run_blood_converges_with_the_step_at_fourth_order():
    """RK4 on the coupled ODEs: the error of a 30-day CD19 course falls ~16x per halving of dt."""
    cfg = tissuesim.load_config(["therapy=cd19"])
    ref, _ = run_blood(cfg, 12.0, dt_min=0.75, every_days=12.0)
    errs = []
    for dt in (24.0, 12.0, 6.0):
        ts, _ = run_blood(cfg, 12.0, dt_min=dt, every_days=12.0)
        errs.append(abs(ts["blood_cd19_car_t_per_ul"][-1] - ref["blood_cd19_car_t_per_ul"][-1]))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(3.5 < o < 4.5 for o in orders), (errs, orders)
    # 15 min (run_blood's default) is within 1e-6 relative of the 1-minute step of the simulation
    a, _ = run_blood(cfg, 12.0, dt_min=15.0, every_days=12.0)
    assert a["blood_cd19_car_t_per_ul"][-1] == pytest.approx(ref["blood_cd19_car_t_per_ul"][-1], rel=1e-6)


def test_baseline_is_a_steady_state():
    b = Blood(BLOOD, {"cd19_car_t": "CD19", "bcma_car_t": "BCMA"}, None)
    y0 = dict(b.y)
    _run(b, 60.0, dt_min=60.0)
    for k, v in y0.items():
        assert b.y[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_crs_grade_thresholds():
    th = BLOOD.crs_il6_thresholds_pg_per_ml  # 20, 100, 500, 2000 pg/mL
    il6 = [0, 19.9, 20, 99, 100, 499, 500, 1999, 2000, 1e5]
    assert list(crs_grade(il6, th)) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_tocilizumab_given_at_grade_2_blocks_the_il6_effect():
    ther = dataclasses.replace(THERAPY, crs_management="tocilizumab")
    b = Blood(BLOOD, {"cd19_car_t": "CD19"}, ther)
    b.y["il6"] = 150.0  # grade 2
    ev = b.advance(1.0)
    assert ev == ["tocilizumab"]
    assert b.crs_grade() == crs_grade(
        b.y["il6"] * (1 - BLOOD.tocilizumab_blockade), BLOOD.crs_il6_thresholds_pg_per_ml
    )
    assert b.crs_grade() < 2
    none = Blood(BLOOD, {"cd19_car_t": "CD19"}, dataclasses.replace(THERAPY, crs_management="none"))
    none.y["il6"] = 150.0
    assert none.advance(1.0) == [] and none.crs_grade() == 2


def test_rituximab_decays_with_its_half_life_and_depletes_b_cells():
    b = Blood(BLOOD, {"cd19_car_t": "CD19"}, None)
    add = b.infuse("rituximab", 1000.0 / 70.0)
    assert add == pytest.approx(1000e3 / 3000.0)  # 1000 mg in 3 L plasma = 333 ug/mL
    _run(b, 20.0, dt_min=60.0)
    assert b.y["rtx"] / add == pytest.approx(0.5, rel=1e-6)
    assert b.b_cell_per_ul() < 0.05 * BLOOD.b_cell_per_ul


def test_lymphodepletion_removes_its_fraction_of_b_cells():
    b = Blood(BLOOD, {"cd19_car_t": "CD19"}, None)
    b.lymphodeplete()
    assert b.b_cell_per_ul() == pytest.approx(
        BLOOD.b_cell_per_ul * (1 - BLOOD.lymphodepletion_b_cell_fraction)
    )


def test_anti_car_response_rises_faster_for_immunogenic_and_allogeneic_products():
    def r_after(imm, allo, days=120.0):
        b = Blood(BLOOD, {"cd19_car_t": "NONE"}, dataclasses.replace(THERAPY, binder_immunogenicity=imm))
        b.infuse("cd19_car_t", 1e6, allogeneic=allo)
        _run(b, days, dt_min=120.0)
        return b.y["R_cd19_car_t"]

    assert r_after(0.0, False) == 0.0
    low, high, allo = r_after(0.3, False), r_after(0.8, False), r_after(0.3, True)
    assert low < high and low < allo
    # logistic solution R = 1 / (1 + (1/R0 - 1) exp(-g t)), g = growth x immunogenicity
    g = BLOOD.anti_car_growth_per_day * 0.8
    r0 = BLOOD.anti_car_seed
    assert high == pytest.approx(1 / (1 + (1 / r0 - 1) * math.exp(-g * 120.0)), rel=1e-4)


def _traffic(sim, cell_type: int, steps: int, dt_min: float) -> int:
    """Arrivals (Immunology.before_move) and exits only, ``steps`` times; returns how many cells
    of ``cell_type`` arrived."""
    imm, arrived = sim.immunology, 0
    for step in range(steps):
        before = sim.cells.n
        imm.before_move(step, dt_min)
        arrived += int(np.sum(sim.cells.type[before : sim.cells.n] == cell_type))
        imm.exits(step, dt_min)
    return arrived


def test_patch_scaling_conserves_cells_crossing_vessel_walls(monkeypatch):
    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "therapy=none"]))
    imm = sim.immunology
    monkeypatch.setattr(imm.blood, "advance", lambda dt: [])  # exchange only
    b_type = sim.cell_types.index("b_cell")
    v_ul = imm.bio.blood.blood_volume_l * 1e6

    def body_b_cells():
        n_patch = int(np.sum(sim.cells.type[: sim.cells.n] == b_type))
        return imm.blood.b_cell_per_ul() * v_ul + n_patch * imm.patch_equivalents, n_patch

    total0, _ = body_b_cells()
    arrived = _traffic(sim, b_type, steps=3000, dt_min=10.0)
    total1, _ = body_b_cells()
    assert total1 == pytest.approx(total0, rel=1e-9)
    # arrivals: Poisson with mean rate x concentration x vessel voxels x dt x inflammation
    mean = (
        imm.table.extravasation[b_type]
        * imm.blood.b_cell_per_ul()
        * imm.n_sites
        * 10.0
        * 3000
        * imm.inflammation_factor()
    )
    assert abs(arrived - mean) < 5 * math.sqrt(mean), (arrived, mean)


def test_patch_scaling_conserves_car_t_crossing_vessel_walls(monkeypatch):
    """CAR-T arrive from the effector and memory pools together (blood_per_ul counts both), so
    both must pay for them: late in a course (day 90 of cd19: 0.004 effectors, 0.372 memory per
    uL) taking them from the effectors alone made a cell out of nothing at each arrival, and its
    exit then tripled blood CAR-T."""
    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "therapy=cd19"]))
    imm = sim.immunology
    monkeypatch.setattr(imm.blood, "advance", lambda dt: [])  # exchange only
    ct = sim.cell_types.index("cd19_car_t")
    imm.blood.y["E_cd19_car_t"], imm.blood.y["M_cd19_car_t"] = 0.04, 3.72  # x10 for arrivals
    v_ul = imm.bio.blood.blood_volume_l * 1e6

    def body_car_t():
        n_patch = int(np.sum(sim.cells.type[: sim.cells.n] == ct))
        return imm.blood.car_t_per_ul("cd19_car_t") * v_ul + n_patch * imm.patch_equivalents

    total0 = body_car_t()
    arrived = _traffic(sim, ct, steps=3000, dt_min=10.0)
    assert arrived >= 5, arrived  # the check below saw arrivals
    assert body_car_t() == pytest.approx(total0, rel=1e-9)
    assert imm.blood.y["M_cd19_car_t"] < 3.72  # memory paid its share


def test_relapse_detector_needs_depletion_b_cell_return_and_autoantibody_rise():
    b = Blood(BLOOD, {"cd19_car_t": "CD19"}, None)
    b.treated = True
    b.y["b_naive"], b.y["b_auto"] = 1.0, 0.0  # depleted
    b._detect_relapse()
    b.y["ab"] = 0.3  # nadir
    b._detect_relapse()
    assert b.depleted and not b.relapse
    b.y["b_naive"] = 0.6 * BLOOD.b_cell_per_ul  # B cells back, autoantibody still at its nadir
    b._detect_relapse()
    assert not b.relapse
    b.y["ab"] = 0.3 * (1 + BLOOD.relapse_autoantibody_rise) * 1.01
    b._detect_relapse()
    assert b.relapse


def test_relapse_triggers_the_second_infusion_not_before_its_day_and_logs_it():
    cfg = tissuesim.load_config(
        ["grid=tiny", "backend=numpy", "therapy=cd19_then_bcma", "therapy.infusions.1.day=0.01"]
    )
    sim = tissuesim.Simulation(cfg)
    sim.blood.relapse = True  # as if detected at once
    for _ in range(10):  # 10 min < day 0.01 (14.4 min)
        sim.step()
    assert sim.blood.car_t_per_ul("bcma_car_t") == 0.0
    for _ in range(10):
        sim.step()
    ev = [e for e in sim.event_log if e.what == "infuse_bcma_car_t"]
    assert len(ev) == 1 and ev[0].day >= 0.01 and "relapse" in ev[0].detail
    assert sim.blood.car_t_per_ul("bcma_car_t") > 0
    for _ in range(5):
        sim.step()
    assert len([e for e in sim.event_log if e.what == "infuse_bcma_car_t"]) == 1


def test_anti_car_t_arrive_specific_to_the_products_in_proportion_to_their_responses(monkeypatch):
    """Anti-CAR T cells come from one clone per CAR binder: they arrive at anti_car_t_max_per_ul x
    sum of the responses R_p, and each is specific to product p with probability R_p / sum R.
    With R_cd19 = 0.6 and R_bcma = 0.2: 3/4 against CD19; with R_bcma = 0 none against BCMA."""
    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "therapy=dual"]))
    imm = sim.immunology
    monkeypatch.setattr(imm.blood, "advance", lambda dt: [])
    monkeypatch.setattr(imm.bio, "anti_car_t_max_per_ul", 20 * imm.bio.anti_car_t_max_per_ul)  # arrivals
    anti = sim.cell_types.index("anti_car_t")
    cd19, bcma = sim.cell_types.index("cd19_car_t"), sim.cell_types.index("bcma_car_t")
    for r19, rb, share in ((0.6, 0.2, 0.75), (0.5, 0.0, 1.0)):
        imm.blood.y["R_cd19_car_t"], imm.blood.y["R_bcma_car_t"] = r19, rb
        assert imm.blood_per_ul("anti_car_t") == pytest.approx(imm.bio.anti_car_t_max_per_ul * (r19 + rb))
        sim.cells.remove(np.ones(sim.cells.n, bool))
        for step in range(4000):
            imm.before_move(step, 10.0)
        a = sim.cells.type[: sim.cells.n] == anti
        spec = sim.cells["specific_to"][: sim.cells.n][a]
        assert a.sum() > 200 and set(np.unique(spec)) <= {cd19, bcma}
        f = float(np.mean(spec == cd19))
        assert abs(f - share) < 4 * math.sqrt(share * (1 - share) / a.sum()) + 1e-12, (f, share, a.sum())


def test_tocilizumab_lowers_the_inflammation_that_draws_cells_into_the_tissue():
    """Extravasation follows the IL-6 that acts: with tocilizumab's receptor blockade b, the
    inflammation factor is that of IL-6 x (1 - b), not of the serum level (which the antibody
    leaves, or even raises)."""
    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "therapy=cd19"]))
    imm, b = sim.immunology, sim.immunology.blood
    b.y["il6"] = 400.0
    raw = imm.inflammation_factor()
    b.toci_day = b.day  # given now: full blockade
    blocked = imm.inflammation_factor()
    gain, kd = imm.bio.inflammation_gain, imm.bio.inflammation_il6_kd_pg_per_ml
    eff = 400.0 * (1 - b.cfg.tocilizumab_blockade)
    assert raw == pytest.approx(1 + gain * 400.0 / (400.0 + kd))
    assert blocked == pytest.approx(1 + gain * eff / (eff + kd)) and blocked < raw
