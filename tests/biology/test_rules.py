"""Each tissue rule against its rate (NumPy backend, small synthetic populations)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tissuesim
from tissuesim.agents import Population, contacts
from tissuesim.backend import NUMPY
from tissuesim.biology import rules
from tissuesim.biology.cells import build_cell_table, ifng_nM_per_min_per_cell, pg_per_ml_per_min_per_cell
from tissuesim.biology.immunology import plain, poisson_small
from tissuesim.grid import Grid
from tissuesim.simulation import CELL_TYPES

BIO = plain(tissuesim.load_config(["grid=tiny", "backend=numpy"]).biology)
TABLE = build_cell_table(BIO, CELL_TYPES)
CAR = CELL_TYPES.index("cd19_car_t")
B = CELL_TYPES.index("b_cell")
PC = CELL_TYPES.index("plasma_cell")


def _pop(n_pairs, spacing=40.0, sep=5.0, target=B):
    """n_pairs CAR-T/target pairs sep um apart, pairs spacing um apart on a square lattice."""
    side = math.ceil(math.sqrt(n_pairs))
    grid = Grid((1, side * 4, side * 4), 10.0)
    pop = Population(NUMPY, capacity=2 * n_pairs + 8)
    rules.register_cell_attributes(pop)
    k = np.arange(n_pairs)
    base = np.stack([(k % side) * spacing + 5.0, (k // side) * spacing + 5.0, np.full(n_pairs, 5.0)], 1)
    pop.add(base, CAR)
    pop.add(base + np.array([sep, 0.0, 0.0]), target)
    return pop, grid


def _kill(pop, grid, now, step=0, seed=1):
    pairs = contacts(pop, BIO.contact_radius_um, [CAR], None, grid=grid)
    return rules.contact_kills(
        pop, pairs, TABLE.can_kill, TABLE.kill_p, now, BIO.handling_time_min, BIO.exhaustion_kills, step, seed
    )


def test_kills_per_contact_follow_the_kill_probability():
    n = 5000
    pop, grid = _pop(n)
    dead, engaged = _kill(pop, grid, now=0.0)
    assert engaged.size == n  # every CAR-T claimed its one target
    p = BIO.kill_probability_per_contact
    k = int(dead.sum())
    assert abs(k - n * p) < 4 * math.sqrt(n * p * (1 - p)), (k, n * p)
    assert int(pop["kills"][:n].sum()) == k


def test_exhaustion_lowers_the_kill_probability_by_exp_minus_kills():
    n = 5000
    pop, grid = _pop(n)
    pop["kills"][:n] = int(BIO.exhaustion_kills)  # one e-fold
    dead, _ = _kill(pop, grid, now=0.0, seed=7)
    p = BIO.kill_probability_per_contact * math.exp(-1.0)
    assert abs(int(dead.sum()) - n * p) < 4 * math.sqrt(n * p * (1 - p))


def test_handling_time_blocks_new_claims_then_frees_the_killer():
    pop, grid = _pop(50)
    _kill(pop, grid, now=0.0)
    _, engaged = _kill(pop, grid, now=BIO.handling_time_min - 1.0, step=1)
    assert engaged.size == 0  # all still engaged
    _, engaged = _kill(pop, grid, now=BIO.handling_time_min, step=2)
    assert engaged.size == 50


def test_car_t_does_not_kill_antigen_negative_cells():
    pop, grid = _pop(200, target=PC)  # plasma cells are CD19-
    dead, engaged = _kill(pop, grid, now=0.0)
    assert engaged.size == 0 and not dead.any()


def _fates(pop, dt, now, step, ifng=0.0, damage=0.0, rtx=None):
    n = pop.n
    u = [rules.rng.uniform(w) for w in rules.rng.draw(pop.id[:n], step, rules.PURPOSE_FATE, 0, 3)]
    rates = {**rules.fate_rates(BIO), "stim_window": np.float32(1e9)}
    idx = {k: CELL_TYPES.index(k) for k in ("b_cell", "plasmablast", "plasma_cell", "macrophage")}
    car = np.zeros(len(CELL_TYPES), bool)
    car[CAR] = True
    return rules.cell_fates(
        pop,
        u,
        dt,
        now,
        TABLE.death_per_min,
        idx,
        rates,
        np.full(n, ifng),
        np.full(n, damage),
        None if rtx is None else np.full(n, rtx, np.float32),
        TABLE.carrying("CD20"),
        car,
    )


def test_stimulated_car_t_double_every_0_78_days():
    pop, _ = _pop(2000)
    pop.remove(pop.type[: pop.n] != CAR)
    pop["last_kill"][: pop.n] = 0.0
    death = TABLE.death_per_min.copy()
    TABLE.death_per_min[:] = 0.0  # isolate division
    try:
        dt, days = 10.0, 1.56
        for s in range(int(days * 1440 / dt)):
            _, divide = _fates(pop, dt, s * dt, s)
            par = np.flatnonzero(divide)
            pop.add(pop.position[par], CAR, last_kill=pop["last_kill"][par])
    finally:
        TABLE.death_per_min[:] = death
    doubling = days / math.log2(pop.n / 2000)
    # 2 doublings from 2000 cells: Poisson-like spread of log2 N is ~1/sqrt(N) ~ 2 %
    assert doubling == pytest.approx(BIO.car_t_doubling_days, rel=0.05)


def test_lifespan_deaths_follow_the_exponential_law():
    n = 20000
    pop = Population(NUMPY, capacity=n)
    rules.register_cell_attributes(pop)
    # anti-CAR T cells neither divide nor change state here: deaths alone
    pop.add(np.full((n, 3), 5.0), CELL_TYPES.index("anti_car_t"))
    dt = 60.0
    tau = BIO.lifespan_days["anti_car_t"]
    surv = {}
    for s in range(int(tau * 24)):
        dead, _ = _fates(pop, dt, s * dt, s)
        pop.remove(dead)
        if s + 1 == int(tau * 12):
            surv[0.5] = pop.n / n
    surv[1.0] = pop.n / n
    for frac, got in surv.items():
        p = math.exp(-frac)
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / n), (frac, got, p)


def test_secretion_unit_conversions():
    # 10 molecules/s, 10 um voxel = 1e-12 L: 10 * 60 / 6.022e23 mol/min / 1e-12 L = 0.996 nM/min
    assert ifng_nM_per_min_per_cell(10.0, 1000.0) == pytest.approx(0.9963, rel=1e-3)
    # 1e-3 pg/h into 1e-9 mL: 1e6 pg/mL/h = 16667 pg/mL/min
    assert pg_per_ml_per_min_per_cell(1e-3, 1000.0) == pytest.approx(1e6 / 60, rel=1e-9)


def test_poisson_small_mean_and_variance():
    lam = np.array([0.01, 0.3, 2.0, 40.0])
    draws = np.array([poisson_small(lam, 5, s) for s in range(20000)])
    for j, m in enumerate(lam):
        assert abs(draws[:, j].mean() - m) < 5 * math.sqrt(m / 20000)
    assert draws[:, 2].var() == pytest.approx(2.0, rel=0.08)


def test_field_sources_from_tissue_damage_and_ifng():
    """Chemokine and damage sources of Immunology._sources against their formulas."""
    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "therapy=none"]))
    imm, f, bio = sim.immunology, sim.fields, sim.immunology.bio
    sim.cells.remove(np.ones(sim.cells.n, dtype=bool))  # tissue sources only
    rng_ = np.random.default_rng(1)
    dmg = rng_.uniform(0, 0.5, f["damage"].shape).astype(f.values.dtype)
    f["damage"][...] = dmg
    f["ifng"][...] = 0
    vox = np.zeros(0, dtype=np.int64)
    none = np.zeros(0, dtype=bool)
    imm._sources(vox, none, none)
    src = {n: imm.source[f.index(n)] for n in f.names}
    np.testing.assert_allclose(src["cxcl10"], bio.cxcl10_nM_per_min_per_damage * dmg, rtol=1e-6)
    np.testing.assert_allclose(src["cxcl13"], bio.cxcl13_nM_per_min_per_damage * dmg, rtol=1e-6)
    # autoantibody damage: repair rate x serum level x baseline damage map (no macrophage term)
    want = imm.repair_per_min * imm.blood.y["ab"] * imm.damage0
    np.testing.assert_allclose(src["damage"], want, rtol=1e-6)
    assert not src["ifng"].any() and not src["il6"].any() and not src["autoantibody"].any()
    # IFN-gamma adds its saturating CXCL10 induction
    f["ifng"][...] = bio.cxcl10_ifng_kd_nM
    imm._sources(vox, none, none)
    np.testing.assert_allclose(
        imm.source[f.index("cxcl10")],
        bio.cxcl10_nM_per_min_per_damage * dmg + 0.5 * bio.cxcl10_nM_per_min,
        rtol=1e-6,
    )


def test_engaged_car_t_and_anti_car_t_secrete_ifng_resting_ones_do_not():
    """IFN-gamma comes from engaged CAR-T and T cells (MODEL.md section 2): an engaged CD19 CAR-T
    and an engaged anti-CAR T cell each add one cell's rate to their voxel; a resting one and an
    engaged B cell add nothing."""
    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "therapy=none"]))
    imm, f = sim.immunology, sim.fields
    sim.cells.remove(np.ones(sim.cells.n, dtype=bool))
    f["damage"][...] = 0
    f["ifng"][...] = 0
    ct = sim.cell_types
    types = np.array([ct.index(c) for c in ("cd19_car_t", "anti_car_t", "anti_car_t", "b_cell")])
    sim.cells.add(np.zeros((4, 3)), types)  # resting (state 0); their voxels are given below
    vox = np.array([10, 20, 30, 40], dtype=np.int64)
    engaged = np.array([True, True, False, True])
    imm._sources(vox, engaged, np.ones(4, dtype=bool))
    got = imm.source[f.index("ifng")].reshape(-1)
    want = np.zeros_like(got)
    want[[10, 20]] = np.float32(imm.ifng_per_cell)
    np.testing.assert_array_equal(got, want)


def test_receptor_uptake_rate_of_each_voxel_from_its_live_consumers():
    """Each live cell of a type in a field's uptake_by removes that field in its voxel at
    rate / (kd + u) per minute (1/min), rate = its uptake at saturation in nM/min: 0.5 molecule/s
    in a 1000 um^3 voxel is 0.5 x 60 / N_A / 1e-12 L = 0.0498 nM/min. Two B cells in one voxel
    count twice; a dead consumer and a non-consumer count nothing."""
    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "therapy=none"]))
    imm, f, cfg = sim.immunology, sim.fields, sim.cfg
    sim.cells.remove(np.ones(sim.cells.n, dtype=bool))
    ct = sim.cell_types
    names = ("b_cell", "b_cell", "cd19_car_t", "plasma_cell", "b_cell", "macrophage")
    sim.cells.add(np.zeros((6, 3)), np.array([ct.index(c) for c in names]))
    vox = np.array([10, 10, 20, 30, 40, 50], dtype=np.int64)
    alive = np.array([True, True, True, True, False, True])
    rng_ = np.random.default_rng(4)
    f.values[...] = rng_.uniform(0, 2, f.values.shape).astype(f.values.dtype)
    f["cxcl13"].reshape(-1)[10] = -1e-3  # a field dipping below zero counts as zero
    imm._sources(vox, np.zeros(6, dtype=bool), alive)
    per_cell = {
        n: cfg.fields[n].uptake_molecules_per_cell_per_s * 60 / 6.02214076e23 / 1e-12 * 1e9 for n in f.names
    }
    assert per_cell["ifng"] == pytest.approx(0.0498, rel=1e-3)
    consumers = {  # voxel -> live consumers of each field
        "cxcl13": {10: 2},
        "cxcl10": {20: 1},
        "ifng": {10: 2, 20: 1, 30: 1, 50: 1},
    }
    for name in ("cxcl13", "cxcl10", "ifng", "il6", "autoantibody", "damage"):
        lam = imm.uptake[f.index(name)].reshape(-1)
        want = np.zeros(lam.shape)
        u = f[name].reshape(-1).astype(np.float64)
        for v, c in consumers.get(name, {}).items():
            want[v] = c * per_cell[name] / (cfg.fields[name].uptake_kd_nM + max(u[v], 0.0))
        np.testing.assert_allclose(lam, want, rtol=2e-6, atol=0, err_msg=name)
    assert imm.uptake[f.index("ifng")].reshape(-1)[40] == 0  # the dead B cell


def test_uptake_removes_the_field_where_consumers_are():
    """One step of a run against the same run without uptake, from one IFN-gamma level everywhere:
    the field drops where consumers sit, by the integral of their uptake over the step (the
    voxel's share e^{-lambda dt} before diffusion spreads it, so checked over the whole patch)."""
    out = []
    for rate in (0.5, 0.0):
        sim = tissuesim.Simulation(
            tissuesim.load_config(
                [
                    "grid=tiny",
                    "backend=numpy",
                    "therapy=none",
                    f"fields.ifng.uptake_molecules_per_cell_per_s={rate}",
                ]
            )
        )
        sim.fields["ifng"][...] = 0.5
        lam = sim.immunology.uptake
        sim.step()
        out.append((sim.fields["ifng"].sum(dtype=np.float64), lam))
    (with_, lam), (without, none) = out
    assert none is None or not none[sim.fields.index("ifng")].any()
    removed = without - with_
    # expected removal: sum over voxels of u0 (1 - e^{-lambda dt}), lambda as the step took it
    lam_ifng = lam[sim.fields.index("ifng")].astype(np.float64)
    want = float((0.5 * -np.expm1(-lam_ifng * sim.dt_min)).sum()) * np.exp(
        -sim.cfg.fields.ifng.decay_per_min * sim.dt_min
    )
    assert want > 0.1  # tens of consumers, each taking ~0.5 x 0.45 of its voxel's 0.5 nM
    assert removed == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize("form", ["contact_kills", "contact_kills_masked"])
def test_anti_car_t_attack_only_the_product_they_were_raised_against(form):
    """Anti-CAR T cells may kill every CAR product (can_kill), but each is specific to one
    (specific_to): next to one CD19 and one BCMA CAR-T at the same distance, with a kill at every
    contact, those raised against CD19 kill CD19 CAR-T only, those against BCMA BCMA CAR-T only,
    and those without a specificity either."""
    anti = CELL_TYPES.index("anti_car_t")
    bcma = CELL_TYPES.index("bcma_car_t")
    assert TABLE.can_kill[anti, CAR] and TABLE.can_kill[anti, bcma]
    n = 300
    side = math.ceil(math.sqrt(n))
    grid = Grid((1, side * 4, side * 4), 10.0)
    pop = Population(NUMPY, capacity=3 * n + 8)
    rules.register_cell_attributes(pop)
    k = np.arange(n)
    base = np.stack([(k % side) * 40.0 + 10.0, (k // side) * 40.0 + 10.0, np.full(n, 5.0)], 1)
    spec = np.array([CAR, bcma, -1], np.int32)[k % 3]
    pop.add(base, anti, specific_to=spec)
    pop.add(base + np.array([5.0, 0.0, 0.0]), CAR)
    pop.add(base - np.array([5.0, 0.0, 0.0]), bcma)
    kill_p = TABLE.kill_p.copy()
    kill_p[anti] = 1.0
    pairs = contacts(pop, BIO.contact_radius_um, [anti], None, grid=grid, exact=form == "contact_kills")
    dead, _ = getattr(rules, form)(
        pop, pairs, TABLE.can_kill, kill_p, 0.0, BIO.handling_time_min, BIO.exhaustion_kills, 0, 1
    )
    dead_car, dead_bcma = dead[n : 2 * n], dead[2 * n :]
    assert dead_car[spec == CAR].all() and not dead_bcma[spec == CAR].any()
    assert dead_bcma[spec == bcma].all() and not dead_car[spec == bcma].any()
    unspecific = spec < 0
    assert (dead_car[unspecific] ^ dead_bcma[unspecific]).all()  # one kill each, either product


@pytest.mark.parametrize("path", ["_births_and_exits_host", "_births_and_exits_device"])
def test_daughters_inherit_every_inherited_attribute_on_both_paths(path):
    """A dividing cell's daughter copies Immunology.INHERIT (kills, last_kill, specific_to, ...)
    on the NumPy path as on the device path (which both run here on NumPy); the NumPy path had
    dropped specific_to, so a daughter of an anti-CAR T cell would have attacked every product."""
    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "therapy=dual"]))
    imm, pop = sim.immunology, sim.cells
    anti, bcma = sim.cell_types.index("anti_car_t"), sim.cell_types.index("bcma_car_t")
    pop.remove(np.ones(pop.n, bool))
    pop.add(np.array([[50.0, 50.0, 5.0]]), anti, state=1, kills=3, last_kill=-7.0, specific_to=bcma)
    imm.blood_on_device = False  # the device path's exits then go to the host blood
    z, div = np.zeros(1, bool), np.ones(1, bool)
    getattr(imm, path)(pop, z, z, div, pop.type[:1].astype(np.int64), 0, 1.0)
    assert pop.n == 2
    for name in imm.INHERIT:
        if name != "position":
            np.testing.assert_array_equal(pop[name][1], pop[name][0], err_msg=name)
    assert pop["specific_to"][1] == bcma
