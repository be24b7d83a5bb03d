"""Persistent random walk (Fuerth MSD), chemotaxis, walls, vessels, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tissuesim.agents import (
    FLAG_BAD_TYPE,
    FLAG_IN_CLOSED_VOXEL,
    MotilityParams,
    Population,
    build_cell_list,
    claim_targets,
    contacts,
    extravasate,
    init_velocity,
    intravasate,
    move,
    ou_coefficients,
    vessel_sites,
)
from tissuesim.grid import Grid


def fuerth(t, speed, persistence, d):
    D = speed * speed * persistence / d
    return 2 * d * D * (t - persistence * (1 - np.exp(-t / persistence)))


def _free_population(be, grid, n, seed, params):
    rs = np.random.default_rng(seed)
    c = np.array(grid.origin) + 0.5 * np.array(grid.extent_um)
    pos = c + rs.uniform(-20, 20, (n, 3))
    if grid.nz == 1:
        pos[:, 2] = grid.origin[2] + 0.5 * grid.dx
    pop = Population(be, capacity=n)
    pop.add(be.asarray(pos.astype(np.float32)), 0)
    init_velocity(pop, params, grid.ndim, seed)
    return pop


def test_ou_coefficients_limits():
    # small dt: Euler-like; the displacement variance ~ (2/3) sigma^2 dt^3 / P
    a, sd_v, c_xv, sd_x, p1a = ou_coefficients(6.0, 3.0, 1e-3, 3)
    assert math.isclose(p1a, 1e-3, rel_tol=1e-3) and math.isclose(a, math.exp(-1e-3 / 3))
    assert math.isclose(sd_v**2, 12.0 * (1 - a * a), rel_tol=1e-9)
    # long dt: diffusive, Var dx -> 2 D dt per axis with D = sigma^2 P
    a, sd_v, c_xv, sd_x, p1a = ou_coefficients(6.0, 3.0, 3000.0, 3)
    assert math.isclose(c_xv**2 + sd_x**2, 2 * 12.0 * 3.0 * 3000.0 * (1 - 1.5 * 3.0 / 3000.0), rel_tol=1e-6)


@pytest.mark.parametrize("ndim,dx", [(2, 30.0), (3, 30.0), (2, 4.0)], ids=["2d", "3d", "2d-fine-dx"])
def test_msd_matches_fuerth(be, ndim, dx):
    """10k cells, free space: MSD(t) within 5% of Fuerth's formula at lags 0.5P .. 10P.

    The statistical error of a 10k-cell MSD is sqrt(2/(d N)) ~ 1% (d = 2) or 0.8% (d = 3), so 5%
    is > 4 sigma; an Euler step (x += v dt) would miss by ~11% at t = dt = P/3 and fail. With
    dx = 4 um a step spans ~2 voxels: the substepping must leave the statistics unchanged.
    """
    speed, P, dt = 6.0, 3.0, 1.0
    grid = Grid((1, 200, 200) if ndim == 2 else (100, 100, 100), dx=dx)
    params = [MotilityParams(speed_um_per_min=speed, persistence_min=P)]
    n = 10_000
    pop = _free_population(be, grid, n, 11 + ndim, params)
    x0 = be.asnumpy(pop.view("position")).astype(np.float64)
    lags = {1: None, 3: None, 10: None, 30: None}
    for s in range(1, 31):
        move(pop, grid, None, dt, s, 1234, params)
        if s in lags:
            d = be.asnumpy(pop.view("position")).astype(np.float64) - x0
            lags[s] = np.mean(np.sum(d * d, axis=1))
    assert pop.check_flags() == 0
    for s, msd in lags.items():
        exp = fuerth(s * dt, speed, P, ndim)
        assert abs(msd / exp - 1) < 0.05, (s, msd, exp)
    v = be.asnumpy(pop.view("velocity"))
    assert abs(np.mean(np.sum(v * v, axis=1)) / speed**2 - 1) < 0.03
    if ndim == 2:
        assert (v[:, 2] == 0).all() and np.allclose(be.asnumpy(pop.view("position"))[:, 2], x0[:, 2])


def _linear_field(grid, slope_per_um, c0):
    x = grid.centres("x")
    return np.broadcast_to(c0 + slope_per_um * (x - grid.origin[0]), grid.shape).astype(np.float32).copy()


def test_chemotactic_drift_formula_single_step(be):
    """With no noise, one step gives v' = (1 - a) v_d, v_d = chi K/(K+c)^2 dc/dx (Lauffenburger)."""
    grid = Grid((1, 20, 40), dx=10.0)
    G, chi = 0.05, 400.0
    for c0, K in [(1.0, 1.0), (9.0, 1.0), (0.0, 2.0)]:
        f = _linear_field(grid, G, c0 - G * 205.0)  # c = c0 at x = 205 um
        params = [
            MotilityParams(
                speed_um_per_min=1e-6,
                persistence_min=2.0,
                chemotaxis_field="cxcl13",
                chemotactic_sensitivity_um2_per_min=chi,
                receptor_kd=K,
                max_drift_fraction=1e9,
            )
        ]
        pop = Population(be)
        pop.add(be.asarray(np.array([[205.0, 105.0, 5.0]], np.float32)), 0)
        move(pop, grid, None, 1.0, 0, 1, params, fields={"cxcl13": be.asarray(f)})
        c = float(f[0, 10, 20])
        vd = chi * K / (K + c) ** 2 * G
        v = be.asnumpy(pop.view("velocity"))[0]
        assert math.isclose(v[0], (1 - math.exp(-0.5)) * vd, rel_tol=1e-4), (c0, K, v, vd)
        assert abs(v[1]) < 1e-5


def _chemotaxis_run(be, with_gradient):
    """2000 cells, 60 min in a linear gradient along x, c << K so v_d is uniform (= 0.3 s)."""
    speed, P, dt, K = 6.0, 3.0, 1.0, 1.0
    grid = Grid((1, 150, 150), dx=20.0)
    G = 2e-6 if with_gradient else 0.0  # c <= 0.006 K: K/(K+c)^2 varies by < 1.2%
    vd = 0.3 * speed
    chi = vd * K / G if G else 1.0
    params = [
        MotilityParams(
            speed_um_per_min=speed,
            persistence_min=P,
            chemotaxis_field="cxcl10",
            chemotactic_sensitivity_um2_per_min=chi,
            receptor_kd=K,
        )
    ]
    f = _linear_field(grid, G, 0.0)
    pop = _free_population(be, grid, 2000, 5, params)
    x0 = be.asnumpy(pop.view("position")).astype(np.float64)
    prev = x0.copy()
    path = np.zeros(2000)
    T = 60
    fields = {"cxcl10": be.asarray(f)}
    for s in range(T):
        move(pop, grid, None, dt, s, 99, params, fields=fields)
        x = be.asnumpy(pop.view("position")).astype(np.float64)
        path += np.linalg.norm(x - prev, axis=1)
        prev = x
    disp = prev - x0
    ci = np.mean(disp[:, 0] / path)
    mean_dx = disp[:, 0].mean()
    return ci, mean_dx, vd * (T - P * (1 - math.exp(-T / P)))


def test_chemotactic_index_in_gradient(be):
    """CI = <dx_gradient / path length> > 0.15, and the mean drift matches v_d within 10%.

    Threshold: the drift is 0.3 s and the per-step chord speed is ~ s, so CI ~ 0.25 (0.2-0.3 is
    the range reported for T cells in chemokine gradients); 0.15 leaves > 10 standard errors to
    zero (SE ~ 0.01 for 2000 cells) while failing for absent, halved or reversed chemotaxis.
    """
    ci, mean_dx, expected = _chemotaxis_run(be, True)
    assert ci > 0.15, ci
    assert abs(mean_dx / expected - 1) < 0.1, (mean_dx, expected)


def test_chemotactic_index_without_gradient(be):
    ci, _mean_dx, _ = _chemotaxis_run(be, False)
    assert abs(ci) < 0.05, ci


@pytest.mark.parametrize("ndim,speed", [(2, 8.0), (3, 8.0), (2, 30.0)], ids=["2d", "3d", "2d-fast"])
def test_never_inside_closed_voxels(be, ndim, speed):
    """10k steps through random closed blocks with crowding; steps near dx, or ~3 dx ('fast')."""
    rs = np.random.default_rng(ndim)
    grid = Grid((1, 24, 24) if ndim == 2 else (8, 10, 10), dx=10.0)
    closed = rs.random(grid.shape) < 0.3
    # closed walls along the middle in x with one gap: cells must slide, not tunnel
    closed[:, :, grid.nx // 2] = True
    closed[:, 2, grid.nx // 2 - 3 : grid.nx // 2 + 4] = False  # a corridor through the wall's one gap
    open_ = ~closed
    cand = np.argwhere(open_)
    pick = cand[rs.integers(0, len(cand), 200)]
    pos = (pick[:, ::-1] + rs.random((200, 3))) * grid.dx
    if ndim == 2:
        pos[:, 2] = 5.0
    pop = Population(be)
    pop.add(be.asarray(pos.astype(np.float32)), be.asarray(rs.integers(0, 2, 200)))
    params = [
        MotilityParams(speed_um_per_min=8.0, persistence_min=4.0, crowding_radius_um=4.0),
        MotilityParams(speed_um_per_min=3.0, persistence_min=1.0),
    ]
    open_flat = open_.reshape(-1)
    om = be.asarray(open_)
    for s in range(10_000):
        move(pop, grid, om, 1.0, s, 7, params)
        if s % 10 == 0:
            vox = be.asnumpy(grid.voxel_index(pop.view("position"), xp=be.xp))
            assert open_flat[vox].all(), f"cell in closed voxel at step {s}"
    p = be.asnumpy(pop.view("position"))
    lo, hi = np.array(grid.origin), np.array(grid.origin) + np.array(grid.extent_um)
    assert (p >= lo).all() and (p <= hi).all()
    assert not pop.check_flags() & FLAG_IN_CLOSED_VOXEL
    # some cells crossed the wall through its one-voxel gap (the maze is traversable, not frozen)
    wall_x = grid.origin[0] + (grid.nx // 2) * grid.dx
    assert np.any((p[:, 0] < wall_x) != (pos[:, 0] < wall_x))


def test_wall_rule_reverses_blocked_component(be):
    grid = Grid((1, 3, 3), dx=10.0)
    open_ = np.ones(grid.shape, bool)
    open_[0, 1, 2] = False  # the voxel to the +x side of the centre
    params = [MotilityParams(speed_um_per_min=1e-6, persistence_min=1e6)]
    pop = Population(be)
    pop.add(
        be.asarray(np.array([[19.0, 15.0, 5.0]], np.float32)),
        0,
        velocity=be.asarray(np.array([[5.0, 2.0, 0.0]], np.float32)),
    )
    move(pop, grid, be.asarray(open_), 1.0, 0, 1, params)
    p = be.asnumpy(pop.view("position"))[0]
    v = be.asnumpy(pop.view("velocity"))[0]
    assert p[0] == np.float32(19.0) and v[0] < 0, "x move into the wall dropped, v_x reversed"
    assert abs(p[1] - 17.0) < 1e-3 and v[1] > 0, "y component slides along the wall"


def test_vessel_entry_and_exit(be):
    grid = Grid((1, 30, 30), dx=10.0)
    vessel = np.zeros(grid.shape, bool)
    vessel[0, 10:12, 5:25] = True
    sites = vessel_sites(be.asarray(vessel), be.xp)
    pop = Population(be)
    added = 0
    for s in range(200):
        ids = extravasate(pop, grid, sites, 2, s, 5, rate_per_min_per_vessel_voxel=0.05, dt_min=1.0)
        added += int(ids.shape[0])
    exp = 0.05 * 40 * 200
    assert abs(added - exp) < 4 * math.sqrt(exp) and pop.n == added
    vox = be.asnumpy(grid.voxel_index(pop.view("position"), xp=be.xp))
    assert vessel.reshape(-1)[vox].all() and (be.asnumpy(pop.view("type")) == 2).all()
    # every vessel voxel used, uniformly (chi-square, 39 dof: 99.9% quantile ~ 72)
    cnt = np.bincount(vox, minlength=grid.n_voxels)[vessel.reshape(-1)]
    assert (cnt > 0).all() and np.sum((cnt - added / 40) ** 2 / (added / 40)) < 72
    # exit: type 2 allowed, probability 1 - exp(-0.1) per step
    pop.add(be.asarray(np.array([[55.0, 105.0, 5.0], [55.0, 5.0, 5.0]], np.float32)), 1)  # type 1 in a vessel
    left = be.asnumpy(intravasate(pop, grid, be.asarray(vessel), 0.1, 1.0, 0, 5, type_filter=[2], ntypes=4))
    p = 1 - math.exp(-0.1)
    assert left[1] == 0 and left[0] == left[3] == 0
    assert abs(left[2] - p * added) < 4 * math.sqrt(added * p)
    assert pop.n == added + 2 - left[2]
    remaining = added - int(left[2])
    left = be.asnumpy(intravasate(pop, grid, be.asarray(vessel), [0, 1e9, 1e9, 0], 1.0, 1, 5, ntypes=4))
    assert left.tolist() == [0, 1, remaining, 0]
    assert pop.n == 1 and be.asnumpy(pop.view("type")).tolist() == [1]  # the type-1 cell outside stays


def _run(be, seed, steps=40):
    grid = Grid((6, 12, 12), dx=10.0)
    rs = np.random.default_rng(0)
    open_ = rs.random(grid.shape) > 0.15
    cand = np.argwhere(open_)
    pick = cand[rs.integers(0, len(cand), 300)]
    pos = ((pick[:, ::-1] + rs.random((300, 3))) * grid.dx).astype(np.float32)
    pop = Population(be, capacity=16, attrs={"kills": np.int32})
    pop.add(be.asarray(pos), be.asarray(rs.integers(0, 3, 300)))
    params = [
        MotilityParams(6.0, 3.0, "cxcl13", 2000.0, 1.0, crowding_radius_um=4.0),
        MotilityParams(3.0, 2.0, crowding_radius_um=5.0),
        MotilityParams(1.0, 1.0),
    ]
    f = {"cxcl13": be.asarray(rs.random(grid.shape).astype(np.float32))}
    init_velocity(pop, params, 3, seed)
    vessel = np.zeros(grid.shape, bool)
    vessel[:, 3, :] = True
    vessel &= open_
    sites = vessel_sites(be.asarray(vessel), be.xp)
    for s in range(steps):
        move(pop, grid, be.asarray(open_), 1.0, s, seed, params, fields=f)
        cl = build_cell_list(pop, grid, 12.0)
        pr = contacts(pop, 12.0, [0], [1], cell_list=cl)
        tof, _ = claim_targets(pop, pr)
        pop["kills"][: pop.n] += (tof >= 0).astype(np.int32)
        extravasate(pop, grid, sites, 0, s, seed, expected_number=2.0)
        intravasate(pop, grid, be.asarray(vessel), 0.05, 1.0, s, seed, ntypes=3)
    return pop.host_arrays()


def test_same_seed_bitwise_identical_other_seed_differs(be):
    a, b, c = _run(be, 21), _run(be, 21), _run(be, 22)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert a["position"].shape != c["position"].shape or a["position"].tobytes() != c["position"].tobytes()
    assert a["kills"].sum() > 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_no_tunnelling_through_thin_wall(be, ndim):
    """A one-voxel closed wall with no gap: fast cells (steps ~3 dx) never reach the other side."""
    grid = Grid((1, 12, 20) if ndim == 2 else (6, 6, 20), dx=10.0)
    open_ = np.ones(grid.shape, bool)
    open_[:, :, 10] = False
    rs = np.random.default_rng(8)
    pos = np.c_[
        rs.uniform(0, 100, 300), rs.uniform(0, grid.extent_um[1], 300), rs.uniform(0, grid.extent_um[2], 300)
    ]
    pos[150:, 0] += 110.0  # half the cells on the right side
    if ndim == 2:
        pos[:, 2] = 5.0
    pop = Population(be)
    pop.add(be.asarray(pos.astype(np.float32)), 0)
    params = [MotilityParams(speed_um_per_min=30.0, persistence_min=3.0)]
    om = be.asarray(open_)
    for s in range(1000):
        move(pop, grid, om, 1.0, s, 3, params)
    x = be.asnumpy(pop.view("position"))[:, 0]
    np.testing.assert_array_equal(x < 100.0, pos[:, 0] < 100.0)
    assert (x < 100.0).sum() == 150
    assert np.abs(x - pos[:, 0]).mean() > 20  # they did move


def test_flags_collected_on_device_and_read_at_check(be):
    from tissuesim.agents import AgentError

    grid = Grid((1, 4, 4), dx=10.0)
    open_ = np.ones(grid.shape, bool)
    open_[0, 0, 0] = False
    pop = Population(be)
    pop.add(be.asarray(np.array([[5.0, 5.0, 5.0], [25.0, 25.0, 5.0]], np.float32)), be.asarray([0, 3]))
    move(pop, grid, be.asarray(open_), 1.0, 0, 1, [MotilityParams(2.0, 1.0)])  # type 3 has no params
    assert pop.check_flags() == FLAG_IN_CLOSED_VOXEL | FLAG_BAD_TYPE
    assert pop.check_flags() == 0  # cleared
    move(pop, grid, be.asarray(open_), 1.0, 1, 1, [MotilityParams(2.0, 1.0)])
    with pytest.raises(AgentError):
        pop.check_flags(strict=True)


def test_numpy_move_in_blocks_of_rows_is_bitwise_one_block(monkeypatch):
    """NumPy moves cells MOVE_BLOCK rows at a time (bounded work arrays): with blocks of 7 rows
    a 40-step run with chemotaxis, crowding, closed voxels, contacts, arrivals and exits ends in
    the state of one block, bit for bit, and flags raised in different blocks are all kept."""
    from tissuesim.agents import motility
    from tissuesim.backend import NUMPY

    ref = _run(NUMPY, 21)
    monkeypatch.setattr(motility, "MOVE_BLOCK", 7)
    got = _run(NUMPY, 21)
    for k in ref:
        assert ref[k].tobytes() == got[k].tobytes(), k
    grid = Grid((1, 4, 4), dx=10.0)
    open_ = np.ones(grid.shape, bool)
    open_[0, 0, 0] = False
    pop = Population(NUMPY)
    pos = np.full((20, 3), 25.0, np.float32)
    pos[3] = (5.0, 5.0, 5.0)  # block 0: in the closed voxel
    pop.add(pos, np.r_[np.zeros(15, np.uint8), np.uint8(3), np.zeros(4, np.uint8)])  # block 2: no params
    move(pop, grid, open_, 1.0, 0, 1, [MotilityParams(2.0, 1.0)])
    assert pop.check_flags() == FLAG_IN_CLOSED_VOXEL | FLAG_BAD_TYPE
