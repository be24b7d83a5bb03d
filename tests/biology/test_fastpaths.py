"""The fast paths of the biology layer give bit for bit what the plain formulation gives.

Blood.advance runs RK4 on lists (Blood._rhs_list) instead of dicts (Blood.rhs); cell_fates
gathers per-type tables (rules.fate_tables); Immunology skips contact searches that cannot
find a claimable pair. Each is checked here against the reference form it replaces.
"""

from __future__ import annotations

import numpy as np

import tissuesim
from tissuesim.agents import Population, contacts
from tissuesim.backend import NUMPY
from tissuesim.biology import rules
from tissuesim.biology.blood import MIN_PER_DAY, Blood
from tissuesim.biology.immunology import plain

CFG = tissuesim.load_config(["grid=tiny", "backend=numpy", "output.progress=false", "therapy=cd19"])
BIO = plain(CFG.biology)
PRODUCTS = {p: str(c.target) for p, c in BIO.car_products.items()}


def _dict_rk4(b: Blood, dt_min: float) -> dict:
    """The reference step: classical RK4 on the dicts of Blood.rhs (the original advance)."""
    h = dt_min / MIN_PER_DAY
    y = b.y
    k1 = b.rhs(y)
    k2 = b.rhs({n: y[n] + 0.5 * h * k1[n] for n in y})
    k3 = b.rhs({n: y[n] + 0.5 * h * k2[n] for n in y})
    k4 = b.rhs({n: y[n] + h * k3[n] for n in y})
    out = {n: max(0.0, y[n] + h / 6.0 * (k1[n] + 2 * k2[n] + 2 * k3[n] + k4[n])) for n in y}
    if out["b_auto"] < b.cfg.extinction_per_ul:
        out["b_auto"] = 0.0
    return out


def test_blood_advance_is_bitwise_the_dict_rk4_in_random_states():
    rng = np.random.default_rng(3)
    products = {**PRODUCTS, "cd20_car_t": "CD20", "other_car_t": "NO_SUCH_ANTIGEN"}
    for trial in range(200):
        b = Blood(BIO.blood, products, plain(CFG.therapy))
        for name in b.y:
            b.y[name] = float(rng.choice([0.0, rng.uniform(0, 2), rng.lognormal(0, 3)]))
        b.y["ab"] = float(rng.choice([0.0, rng.uniform(0, 3)]))
        for p in products:
            b.growth[p] = float(rng.uniform(0, 0.5))
        if trial % 3 == 0:
            b.steroid_day = 1.0
        dt = float(rng.choice([1.0, 15.0, 30.0, 0.37]))
        ref = _dict_rk4(b, dt)
        b.advance(dt)
        assert list(b.y) == list(ref)
        for name in ref:
            assert np.float64(b.y[name]).tobytes() == np.float64(ref[name]).tobytes(), (trial, name)


def _reference_fates(pop, u, dt_min, now_min, death, idx, rates, ifng_at, damage_at, rtx_at, cd20, car_mask):
    """cell_fates as first written: per-cell where chains, then prob of each rate array."""
    xp = np
    n = pop.n
    t = pop.type[:n].astype(np.int64)
    st = pop.state[:n].copy()
    r = np.zeros(n) if rtx_at is None else np.maximum(rtx_at.astype(np.float64), 0.0)
    rtx_hazard = rates["rtx_kill"] * r / (r + rates["rtx_ec50"])
    dead = u[0] < rules.prob(death[t] + cd20[t] * rtx_hazard, dt_min)
    is_b = t == idx["b_cell"]
    is_car = car_mask[t]
    act = st == rules.ACTIVATED
    div_rate = xp.zeros(n, dtype=np.float64)
    div_rate = xp.where(is_b, xp.where(act, rates["b_div_act"], rates["b_div"]), div_rate)
    stimulated = (np.float32(now_min) - pop["last_kill"][:n]) < rates["stim_window"]
    div_rate = xp.where(is_car & stimulated, rates["car_div"], div_rate)
    divide = (u[1] < rules.prob(div_rate, dt_min)) & ~dead
    is_pb = t == idx["plasmablast"]
    is_mac = t == idx["macrophage"]
    r = xp.zeros(n, dtype=np.float64)
    r = xp.where(is_b & ~act, rates["b_act"] * damage_at, r)
    r = xp.where(is_b & act, rates["pb_diff"], r)
    r = xp.where(is_pb, rates["pc_diff"], r)
    mac_on = rates["mac_ifng"] * ifng_at / (ifng_at + rates["mac_kd"]) + rates["mac_damage"] * damage_at
    r = xp.where(is_mac & ~act, mac_on, r)
    r = xp.where(is_mac & act, rates["mac_off"], r)
    change = (u[2] < rules.prob(r, dt_min)) & ~dead & ~divide
    typ = pop.type[:n].copy()
    typ = xp.where(change & is_b & act, np.uint8(idx["plasmablast"]), typ)
    typ = xp.where(change & is_pb, np.uint8(idx["plasma_cell"]), typ)
    new = xp.where((change & is_b & ~act) | (change & is_mac & ~act), np.uint8(rules.ACTIVATED), st)
    new = xp.where((change & is_b & act) | (change & is_pb) | (change & is_mac & act), np.uint8(0), new)
    return dead, divide, typ, new


def test_cell_fates_tables_match_the_per_cell_formulation_bitwise():
    sim = tissuesim.Simulation(CFG)
    imm = sim.immunology
    rng = np.random.default_rng(5)
    nt = len(sim.cell_types)
    n = 4000
    pop = Population(NUMPY, capacity=n)
    rules.register_cell_attributes(pop)
    pop.add(np.zeros((n, 3)), rng.integers(0, nt, n).astype(np.uint8), state=rng.integers(0, 2, n))
    pop["last_kill"][:n] = np.where(rng.random(n) < 0.5, -1e30, rng.uniform(0, 100, n)).astype(np.float32)
    for with_rtx in (False, True):
        # rates large enough that every branch fires often
        rates = {k: (v * 500 if isinstance(v, float) else v) for k, v in imm.rates.items()}
        # rituximab field values around its EC50, some zero and some slightly negative
        rtx = rng.uniform(-1, 30, n).astype(np.float32) if with_rtx else None
        u = rng.random((4, n), dtype=np.float32)
        ifng = rng.uniform(0, 2, n).astype(np.float32)
        dmg = rng.uniform(0, 1, n).astype(np.float32)
        death = imm.table.death_per_min * 300
        args = (10.0, 77.0, death, imm.idx, rates, ifng, dmg, rtx, imm.cd20, imm.car_mask)
        ref = _reference_fates(pop, u, *args)
        dead, divide = rules.cell_fates(pop, u, *args)
        np.testing.assert_array_equal(dead, ref[0])
        np.testing.assert_array_equal(divide, ref[1])
        np.testing.assert_array_equal(pop.type[:n], ref[2])
        np.testing.assert_array_equal(pop.state[:n], ref[3])
        assert ref[1].sum() > 10 and ref[0].sum() > 10 and (ref[3] != 0).sum() > 10


def test_contact_precheck_never_skips_a_search_that_finds_a_claimable_pair():
    sim = tissuesim.Simulation(CFG)
    imm = sim.immunology
    pop = sim.cells
    rng = np.random.default_rng(11)
    car = sim.cell_types.index("cd19_car_t")
    b = sim.cell_types.index("b_cell")
    radius = imm.bio.contact_radius_um
    found = skipped = 0
    for trial in range(300):
        pop.remove(np.ones(pop.n, bool))
        k = int(rng.integers(1, 6))
        centre = rng.uniform(50, 400, (1, 3)) * np.array([1, 1, 0]) + np.array([0, 0, 5.0])
        pop.add(centre + rng.uniform(-radius, radius, (k, 3)) * np.array([1.5, 1.5, 0]), car)
        pop.add(centre + rng.uniform(-radius, radius, (k, 3)) * np.array([1.5, 1.5, 0]), b)
        now = 10.0
        pop["busy_until"][: pop.n] = np.where(rng.random(pop.n) < 0.2, 20.0, 0.0).astype(np.float32)
        need = imm._contact_search_needed(pop, pop.n, now)
        pairs = contacts(pop, radius, imm.killer_types, imm.target_types, grid=sim.grid)
        i, j = pairs.i.astype(np.int64), pairs.j.astype(np.int64)
        t = pop.type[: pop.n]
        free = pop["busy_until"][: pop.n] <= np.float32(now)
        claimable = bool((imm.table.can_kill[t[i], t[j]] & free[i]).any())
        found += claimable
        skipped += not need
        assert need or not claimable, trial
    assert found > 30 and skipped > 30


def _engage(sim, pairs: int, rs) -> None:
    """CD19 CAR-T / B cell and BCMA CAR-T / plasma cell pairs 3 um apart in open voxels."""
    open_idx = np.flatnonzero(sim.tissue.open_mask().reshape(-1))
    k, j, i = np.unravel_index(rs.choice(open_idx, 2 * pairs, replace=False), sim.grid.shape)
    target = ((np.stack([i, j, k], 1) + 0.5) * sim.grid.dx).astype(np.float32)
    ct = sim.cell_types
    tt = np.repeat([ct.index("b_cell"), ct.index("plasma_cell")], pairs).astype(np.uint8)
    kt = np.repeat([ct.index("cd19_car_t"), ct.index("bcma_car_t")], pairs).astype(np.uint8)
    sim.cells.add(np.concatenate([target, target + np.float32([3, 0, 0])]), np.concatenate([tt, kt]))


def test_device_path_of_the_step_is_bitwise_the_host_path():
    """Immunology.device_paths, the sync-free forms the GPU takes (padded contact buffer, kills
    as masks, one compaction that appends the daughters, atomic per-voxel counts), run here on
    NumPy arrays: 120 steps with many kills, births and exits end in the host path's state, bit
    for bit."""
    cfg = ["grid=small", "backend=numpy", "output.progress=false", "therapy=cd19", "seed=5"]
    sims = []
    for device in (False, True):
        sim = tissuesim.Simulation(tissuesim.load_config(cfg))
        sim.immunology.device_paths = device
        sim.run(until_day=0.5)
        _engage(sim, 150, np.random.default_rng(2))
        sims.append(sim)
    a, b = sims
    n0, id0 = a.cells.n, a.cells.next_id
    for _ in range(120):
        a.step()
        b.step()
    assert (a.cells.n, a.cells.next_id) == (b.cells.n, b.cells.next_id)
    for name in a.cells.names:
        assert a.cells.view(name).tobytes() == b.cells.view(name).tobytes(), name
    assert a.fields.values.tobytes() == b.fields.values.tobytes()
    assert a.blood.y == b.blood.y
    # the path was exercised: kills, deaths and births happened
    assert int(a.cells.view("kills").sum()) >= 5
    assert a.cells.next_id > id0 and a.cells.n < n0 + (a.cells.next_id - id0)
