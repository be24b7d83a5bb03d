"""kernels/agents.cu (+ philox.cuh) run on the host, every kernel against its NumPy twin.

No GPU is needed: the kernel source is built with g++ together with tests/fields/
cuda_host_shim.cpp (threadIdx/blockIdx, integer atomics, __float_as_uint, __umulhi, ...; see
tests/agents/cuda_host_shim_agents.cpp) and driven by the real CuPy-path Python code
(build_cell_list, contacts, crowd_displacement, claim_targets, move, _kernels.launch) through a
fake "cupy" backend whose kernels are the emulated ones. The stand-in kernel (conftest's
EmulatedKernel)

- checks every launch argument against the C signature parsed from agents.cu (pointer dtypes and
  C-contiguity, np.int32/np.uint32/np.int64/np.float32 scalars), the options and the launch shape;
- hands each array over with guard bytes around it and checks them afterwards (out-of-bounds
  writes), checks const arrays are left alone and no written __restrict__ array aliases another;
- runs the threads of the real grid (BLOCK-sized blocks) one by one, forward, reversed or shuffled
  (the ``dev`` fixture), so results that depend on thread order (atomics) show up.

Integer and bitwise outputs must match exactly (Philox bits, bin keys, cell lists, pairs, claims,
flags); float outputs to float32 tolerance (summation order and libm vs NumPy transcendentals).
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from tissuesim.agents import (
    MotilityParams,
    Population,
    build_cell_list,
    claim_targets,
    contacts,
    move,
    rng,
)
from tissuesim.agents import _kernels as K
from tissuesim.agents.neighbours import bin_keys_numpy, crowd_displacement
from tissuesim.backend import NUMPY, Backend
from tissuesim.grid import Grid

KERNELS = set(K.KERNEL_NAMES)


@pytest.fixture(scope="module")
def emu_lib(build_host_kernels):
    return build_host_kernels("emu_agents", Path(__file__).resolve().parent / "cuda_host_shim_agents.cpp")


@pytest.fixture(params=["forward", "reverse", "shuffle"])
def dev(request, emu_lib, monkeypatch, kernel_signatures, emulated_kernel):
    """A fake cupy backend whose agents kernels run emulated, threads in the given order."""
    sigs = kernel_signatures(K.FILENAME)
    xp = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    xp.asnumpy = np.asarray
    fake = Backend("cupy", xp, 0)
    log: list = []

    def get_kernel(be, filename, name, options=(), name_expressions=None):
        assert be is fake and filename == "agents.cu" and name_expressions is None
        assert tuple(options) == ("--fmad=false",), options
        return emulated_kernel(emu_lib, name, sigs[name], request.param, log)

    monkeypatch.setattr(K, "get_kernel", get_kernel)
    return types.SimpleNamespace(be=fake, xp=xp, log=log)


def _launched(dev, name):
    calls = [args for nm, args in dev.log if nm == name]
    assert calls, f"{name} was not launched"
    return calls


def test_signatures_parsed(kernel_signatures):
    sigs = kernel_signatures(K.FILENAME)
    assert set(sigs) == KERNELS, "a kernel was added or removed: cover it here"
    assert sigs["claim_choose"][2] == ("val", np.int64, False)
    assert sigs["claim_choose"][-1] == ("ptr", np.dtype(np.uint64), False)
    assert sigs["move_cells"][0] == ("ptr", np.dtype(np.float32), False)
    assert sigs["move_cells"][19] == ("val", np.uint32, False)


# --------------------------------------------------------------------------- populations

GRIDS = [
    Grid((1, 13, 17), dx=10.0, origin=(5.0, -20.0, 0.0)),
    Grid((6, 7, 8), dx=10.0, origin=(0.0, 3.0, -7.0)),
]
GRID_IDS = ["2d", "3d"]


def _positions(grid: Grid, n: int, rs) -> np.ndarray:
    o, ext = np.array(grid.origin), np.array(grid.extent_um)
    pos = (o + rs.random((n, 3)) * ext).astype(np.float32)
    pos[: n // 20, 0] = grid.origin[0]  # on faces
    pos[n // 20 : n // 10, 1] = grid.origin[1] + grid.extent_um[1]
    pos[n // 10 : n // 10 + 5, 2] = grid.origin[2] - 3.0  # outside: clipped bins and voxels
    if grid.nz == 1:
        pos[:, 2] = grid.origin[2] + 5.0
    # the last 4 m cells: m cells on a 1/4 um lattice, a copy of each (coincident: the crowding
    # split rule), and one 2 um either side along x (exact distance ties for the claims)
    m = n // 50
    a0 = pos[n - 4 * m : n - 3 * m]
    a0[:, :2] = np.clip(np.round(a0[:, :2] * 4) / 4, np.array(grid.origin[:2]) + 2, None)
    pos[n - 3 * m : n - 2 * m] = a0
    pos[n - 2 * m : n - m] = a0 + np.float32([2, 0, 0])
    pos[n - m :] = a0 - np.float32([2, 0, 0])
    return pos


def _pops(dev, grid: Grid, n: int, seed: int, types_=(0, 1, 2)):
    rs = np.random.default_rng(seed)
    pos = _positions(grid, n, rs)
    typ = rs.choice(np.asarray(types_, dtype=np.uint8), n)
    vel = rs.normal(0, 3, (n, 3)).astype(np.float32)
    if grid.nz == 1:
        vel[:, 2] = 0
    out = []
    for be in (NUMPY, dev.be):
        p = Population(be, capacity=max(16, n // 3))  # grown by add: capacity > n, as in runs
        p.add(pos.copy(), typ.copy(), velocity=vel.copy())
        out.append(p)
    return out


# --------------------------------------------------------------------------- neighbours


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_bin_keys_and_cell_list(dev, grid):
    a, b = _pops(dev, grid, 700, 1)
    ca, cb = build_cell_list(a, grid, 12.0), build_cell_list(b, grid, 12.0)
    (args,) = _launched(dev, "bin_keys")
    key = args[-1]
    np.testing.assert_array_equal(key, bin_keys_numpy(a.position, a.n, grid.origin, 12.0, ca.nb))
    assert ca.nb == cb.nb
    for name in ("order", "bin_start", "bin_end"):
        np.testing.assert_array_equal(getattr(ca, name), getattr(cb, name), err_msg=name)
    _launched(dev, "bin_ranges_fill")  # the ranges came from the kernel
    assert (ca.bin_start == ca.bin_end).any()  # empty bins too


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("src,tgt", [([0, 1], [1, 2]), (None, None), ([2], [2])], ids=["some", "all", "one"])
def test_contacts_exact(dev, grid, src, tgt):
    a, b = _pops(dev, grid, 600, 2, types_=(0, 1, 2, 40))  # type 40: outside every 32-bit mask
    pa = contacts(a, 12.0, src, tgt, grid=grid)
    pb = contacts(b, 12.0, src, tgt, grid=grid)
    assert pa.n == pb.n and int(pa.n_device) == int(pb.n_device)
    assert pa.n > 30
    assert not (a.type[pa.i] == 40).any() and not (a.type[pa.j] == 40).any()
    np.testing.assert_array_equal(pa.i, pb.i)  # same pairs in the same order
    np.testing.assert_array_equal(pa.j, pb.j)
    assert set(zip(pa.i.tolist(), pa.j.tolist())) == set(zip(pb.i.tolist(), pb.j.tolist()))
    (cargs,) = _launched(dev, "count_pairs")
    np.testing.assert_array_equal(cargs[-1], np.bincount(pa.i, minlength=a.n))
    _launched(dev, "write_pairs")
    assert a.check_flags() == b.check_flags() == 0


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("capacity", [100000, 300])
def test_contacts_buffered(dev, grid, capacity):
    a, b = _pops(dev, grid, 600, 3)
    a.pair_capacity = b.pair_capacity = capacity
    pa = contacts(a, 12.0, [0, 1], [1, 2], grid=grid, exact=False)
    pb = contacts(b, 12.0, [0, 1], [1, 2], grid=grid, exact=False)
    assert pa.i.shape == pb.i.shape == (capacity,)
    np.testing.assert_array_equal(pa.i, pb.i)
    np.testing.assert_array_equal(pa.j, pb.j)
    assert int(pa.n_device) == int(pb.n_device)
    fa, fb = a.check_flags(), b.check_flags()
    assert fa == fb == (K.FLAG_PAIR_OVERFLOW if int(pa.n_device) > capacity else 0)
    assert (capacity < int(pa.n_device)) == (capacity == 300)
    assert a.pair_capacity == b.pair_capacity


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_crowd_displacement(dev, grid):
    a, b = _pops(dev, grid, 700, 4)
    r = np.array([5.0, 4.0, 0.0], np.float32)
    k = np.array([1.0, 0.3, 0.0], np.float32)
    da = crowd_displacement(a, build_cell_list(a, grid, 10.0), r, k, 0.7)
    db = crowd_displacement(b, build_cell_list(b, grid, 10.0), r, k, 0.7)
    _launched(dev, "crowd_displacement")
    assert db.dtype == np.float32 and db.shape == (a.n, 3)
    # float32 sums of a few terms in another order (the twin adds in float64): a few ulp
    scale = float(np.abs(da).max())
    assert scale > 1.0
    np.testing.assert_allclose(db, da, rtol=1e-5, atol=1e-6 * scale)
    # coincident cells were split along x, lower id to -x: same signs as the twin
    assert np.array_equal(np.sign(da[:, 0]), np.sign(db[:, 0]))
    # cells of radius 0 neither push nor are pushed
    assert not db[a.type[: a.n] == 2].any()


# --------------------------------------------------------------------------- claims


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("exact", [True, False])
def test_claims(dev, grid, rounds, exact):
    a, b = _pops(dev, grid, 700, 5)
    rs = np.random.default_rng(6)
    src_ok = rs.random(a.n) < 0.8
    tgt_ok = rs.random(a.n) < 0.9
    out = []
    for p in (a, b):
        p.pair_capacity = 12 * p.n  # exact=False: buffers padded with -1
        pairs = contacts(p, 15.0, [0], [1, 2], grid=grid, exact=exact)
        if exact:
            assert pairs.n > 50
        else:
            assert (pairs.i == -1).any()
        out.append(claim_targets(p, pairs, src_ok.copy(), tgt_ok.copy(), rounds=rounds))
    for name in ("claim_choose", "claim_resolve", "claim_commit"):
        assert len(_launched(dev, name)) == rounds
    assert len(_launched(dev, "claim_init")) == 1  # the later rounds reset best and winner by fills
    (ta, ka), (tb, kb) = out
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(ka, kb)
    won = np.flatnonzero(ta >= 0)
    assert won.size > 20
    np.testing.assert_array_equal(ka[ta[won]], won)  # a one-to-one matching


@pytest.mark.parametrize("masks", ["none", "source", "target", "int"])
def test_claim_init_matches_twin(dev, masks):
    """claim_targets on the device starts from claim_init (one launch): with either eligibility
    mask left out (every cell eligible, the spare byte never read), or given as integers (read as
    != 0 after the twin's cast to uint8, 256 included), the matching is the twin's."""
    grid = GRIDS[1]
    a, b = _pops(dev, grid, 500, 8)
    rs = np.random.default_rng(8)
    src = rs.random(a.n) < 0.7
    tgt = rs.integers(0, 3, a.n) * 256 + rs.integers(0, 3, a.n)  # astype(uint8): 0, 1 or 2
    given = {"none": (None, None), "source": (src, None), "target": (None, tgt > 300), "int": (src, tgt)}[
        masks
    ]
    out = []
    for p in (a, b):
        pairs = contacts(p, 15.0, [0], [1, 2], grid=grid)
        s_ok, t_ok = (None if m is None else p.xp.asarray(m.copy()) for m in given)
        out.append(claim_targets(p, pairs, s_ok, t_ok, rounds=2))
    (ta, ka), (tb, kb) = out
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(ka, kb)
    assert (ta >= 0).sum() > 10
    assert len(_launched(dev, "claim_init")) == 1


def test_claim_ties_go_to_lowest_index_and_id(dev):
    """Equal distances: a source takes its lowest-index target, a target its lowest-id source."""
    grid = Grid((1, 4, 4), dx=10.0)
    # sources 0, 1 at +-2 um of target 2 (same r^2); source 0 also 2 um from target 3
    pos = np.array([[18, 20, 5], [22, 20, 5], [20, 20, 5], [16, 20, 5], [30, 30, 5]], np.float32)
    typ = np.array([0, 0, 1, 1, 1], np.uint8)
    res = []
    for be in (NUMPY, dev.be):
        p = Population(be, capacity=8)
        p.add(pos, typ)
        res.append(claim_targets(p, contacts(p, 5.0, [0], [1], grid=grid), rounds=2))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    np.testing.assert_array_equal(res[0][1], res[1][1])
    np.testing.assert_array_equal(res[1][0], [2, -1, -1, -1, -1])  # 1 lost target 2 in round 1
    best = _launched(dev, "claim_choose")[0][-1]  # round 1
    key2 = (np.uint64(np.float32(4.0).view(np.uint32)) << np.uint64(32)) | np.uint64(2)
    assert best[0] == key2 and best[1] == key2


# --------------------------------------------------------------------------- motility


def _move_both(dev, grid, a, b, params, dt, step, seed, open_, fields):
    outs = []
    for p, be in ((a, NUMPY), (b, dev.be)):
        move(p, grid, be.asarray(open_), dt, step, seed, params, fields=fields)
        outs.append(p.host_arrays() | {"flags": p.check_flags()})
    return outs


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_move_cells(dev, grid):
    a, b = _pops(dev, grid, 700, 7)
    start = a.position[: a.n].copy()
    rs = np.random.default_rng(8)
    open_ = rs.random(grid.shape) > 0.2
    params = [
        MotilityParams(6.0, 3.0, "cxcl13", 300.0, 0.5, crowding_radius_um=4.0),
        MotilityParams(3.0, 1.0, "cxcl10", 100.0, 2.0, 0.5),
        MotilityParams(0.0, 1.0),
    ]
    fields = {nm: rs.random(grid.shape).astype(np.float32) for nm in ("cxcl13", "cxcl10")}
    fields["cxcl10"] *= 50.0  # steep: the drift cap applies
    na, nb = _move_both(dev, grid, a, b, params, 0.7, 12, 99, open_, fields)
    for name in ("crowd_displacement", "move_cells"):
        _launched(dev, name)
    assert na["flags"] == nb["flags"] and na["flags"] & K.FLAG_IN_CLOSED_VOXEL
    # same float32 arithmetic; only libm's logf/sinf/cosf may differ from NumPy's by an ulp
    np.testing.assert_allclose(nb["position"], na["position"], rtol=2e-6, atol=2e-4)
    np.testing.assert_allclose(nb["velocity"], na["velocity"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(na["age"], nb["age"])
    assert (np.abs(nb["position"] - start).max(axis=1) > 0).mean() > 0.5


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_move_cells_flags_walls_and_caps(dev, grid):
    """Bad types, capped displacements, many walls: same flags and the same outcome."""
    a, b = _pops(dev, grid, 500, 9, types_=(0, 1, 3))  # type 3: no motility parameters
    open_ = np.random.default_rng(10).random(grid.shape) > 0.5
    params = [MotilityParams(2000.0, 5.0), MotilityParams(4.0, 2.0, "f", 50.0, 1.0)]
    fields = {"f": np.random.default_rng(11).random(grid.shape).astype(np.float32)}
    na, nb = _move_both(dev, grid, a, b, params, 2.0, 3, -5, open_, fields)
    want = K.FLAG_BAD_TYPE | K.FLAG_DISPLACEMENT_CAPPED | K.FLAG_IN_CLOSED_VOXEL
    assert na["flags"] == nb["flags"] == want
    bad = na["type"] == 3
    np.testing.assert_array_equal(nb["position"][bad], a.position[: a.n][bad])  # bad types stay put
    np.testing.assert_allclose(nb["position"], na["position"], rtol=2e-6, atol=2e-4)
    np.testing.assert_allclose(nb["velocity"], na["velocity"], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_move_bad_type_with_crowding(dev, grid):
    """A type without parameters among crowding cells: flagged, never read past the type tables."""
    a, b = _pops(dev, grid, 400, 12, types_=(0, 1, 7))
    params = [
        MotilityParams(3.0, 2.0, crowding_radius_um=5.0),
        MotilityParams(2.0, 1.0, crowding_radius_um=3.0),
    ]
    na, nb = _move_both(dev, grid, a, b, params, 0.5, 4, 8, np.ones(grid.shape, bool), None)
    assert na["flags"] == nb["flags"] == K.FLAG_BAD_TYPE
    np.testing.assert_allclose(nb["position"], na["position"], rtol=2e-6, atol=2e-4)
    np.testing.assert_allclose(nb["velocity"], na["velocity"], rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- random numbers

KAT = [  # Random123 known answers of Philox4x32-10 reachable through the counter layout
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _philox_fill(dev, ids, step, purpose, draw, k0, k1):
    xp = dev.xp
    out = xp.zeros((ids.size, 4), dtype=np.uint32)
    K.launch(
        dev.be,
        "philox_fill",
        ids.size,
        (
            xp.asarray(ids),
            np.int32(ids.size),
            np.uint32(step),
            np.uint32(purpose),
            np.uint32(draw),
            np.uint32(k0),
            np.uint32(k1),
            out,
        ),
    )
    return out


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_fill_known_answers(dev, ctr, key, expected):
    cid = np.array([(ctr[1] << 32) | ctr[0]], dtype=np.uint64).view(np.int64)
    out = _philox_fill(dev, cid, ctr[2], ctr[3] >> 16, ctr[3] & 0xFFFF, *key)
    np.testing.assert_array_equal(out[0], np.array(expected, dtype=np.uint32))


def test_philox_fill_bits_match_twin(dev):
    ids = np.concatenate([np.arange(1500), [2**33 + 5, 2**62, -1, -(2**63)]]).astype(np.int64)
    for seed, step, purpose, draw in [
        (0xDEADBEEF12345, 77, 3, 1),
        (-3, 2**32 - 1, 0xFFFF, 0xFFFF),
        (0, 0, 1, 0),
    ]:
        k0, k1 = rng.seed_key(seed)
        out = _philox_fill(dev, ids, step, purpose, draw, k0, k1)
        np.testing.assert_array_equal(out, np.stack(rng.draw(ids, step, purpose, draw, seed), axis=1))


def test_philox_uniform_fill_matches_twin(dev, monkeypatch):
    """rng.draw_uniform through its device path (one philox_uniform_fill launch) equals the
    NumPy form, rng.uniform of rng.draw's four words, bit for bit."""
    monkeypatch.setattr("tissuesim.fields._device.backend_of", lambda a: dev.be)
    ids = np.concatenate([np.arange(1500), [2**33 + 5, 2**62, -1, -(2**63)]]).astype(np.int64)
    for seed, step, purpose, draw in [(0xDEADBEEF12345, 77, 64, 1), (-3, 2**32 - 1, 0xFFFF, 0xFFFF)]:
        got = rng.draw_uniform(dev.xp.asarray(ids), step, purpose, draw, seed, xp=dev.xp)
        want = rng.uniform(np.stack(rng.draw(ids, step, purpose, draw, seed)), np)
        assert got.shape == (4, ids.size) and got.dtype == np.float32
        assert np.asarray(got).tobytes() == want.tobytes()
    assert len(_launched(dev, "philox_uniform_fill")) == 2
    # rng.draw's device path (philox_fill through the same launcher) gives draw's words
    words = rng.draw(dev.xp.asarray(ids), 77, 64, 1, 0xDEADBEEF12345, xp=dev.xp)
    for got_w, want_w in zip(words, rng.draw(ids, 77, 64, 1, 0xDEADBEEF12345)):
        assert np.array_equal(np.asarray(got_w), want_w)
    assert len(_launched(dev, "philox_fill")) == 1


def test_box_muller_fill_matches_twin(dev):
    xp = dev.xp
    r = rng.draw(np.arange(3000, dtype=np.int64), 5, 1, 0, 42)
    a = np.concatenate([r[0], np.array([0, 1, 511, 512, 0xFFFFFFFF, 0x80000000], np.uint32)])
    b = np.concatenate([r[1], np.array([0xFFFFFFFF, 0, 0x40000000, 0x7FFFFFFF, 0, 0xC0000000], np.uint32)])
    n = a.size
    z0, z1 = xp.zeros(n, dtype=np.float32), xp.zeros(n, dtype=np.float32)
    K.launch(dev.be, "box_muller_fill", n, (xp.asarray(a), xp.asarray(b), np.int32(n), z0, z1))
    e0, e1 = rng.box_muller(a, b)
    # libm vs NumPy logf/cosf/sinf: an ulp or two of the factors, relative to r = |z|
    tol = 1e-6 * (1 + np.hypot(e0, e1))
    assert (np.abs(z0 - e0) <= tol).all() and (np.abs(z1 - e1) <= tol).all()
    assert np.abs(z0).max() > 4 and np.isfinite(z0).all() and np.isfinite(z1).all()


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_init_velocity_fill_matches_twin(dev, grid):
    """init_velocity(start=...) on the device (one init_velocity_fill launch for the appended
    rows) against the NumPy form: the same Philox block per id, Box-Muller to an ulp or two of
    log/cos/sin (libm vs NumPy), the type's speed, z = 0 in 2D; rows before start untouched."""
    from tissuesim.agents import init_velocity

    params = [MotilityParams(speed_um_per_min=s, persistence_min=3.0) for s in (2.0, 0.0, 11.0)]
    host, devp = _pops(dev, grid, 400, seed=9)
    before = np.asarray(devp.velocity[:400]).copy()
    rs = np.random.default_rng(9)
    more = (np.array(grid.origin) + rs.random((150, 3)) * np.array(grid.extent_um)).astype(np.float32)
    typ = rs.choice(np.array([0, 1, 2], np.uint8), 150)
    for p in (host, devp):
        p.add(p.xp.asarray(more.copy()), p.xp.asarray(typ.copy()))
        init_velocity(p, params, grid.ndim, seed=21, start=400)
    got = np.asarray(devp.velocity[: devp.n])
    want = np.asarray(host.velocity[: host.n])
    assert np.array_equal(got[:400], before), "rows before start changed"
    tol = 2e-6 * (1 + np.abs(want[400:]))
    assert (np.abs(got[400:] - want[400:]) <= tol).all()
    assert (got[400:][typ == 1] == 0).all() and np.abs(got[400:][typ == 2]).max() > 5
    if grid.nz == 1:
        assert (got[400:, 2] == 0).all()
    assert len(_launched(dev, "init_velocity_fill")) == 1


def _fates_population(be, typ, state, last_kill=None, pos=None, spare=3):
    """A Population on ``be`` holding the given cells with the ``last_kill`` column the
    Simulation registers for the fate rules (minutes; -1e30 = never killed)."""
    xp, n = be.xp, len(typ)
    pop = Population(be, capacity=n + spare)
    pop.register("last_kill", np.float32, fill=-1e30)
    pos = np.zeros((n, 3), np.float32) if pos is None else pos
    pop.add(xp.asarray(pos), xp.asarray(typ), state=xp.asarray(state))
    if last_kill is not None:
        pop["last_kill"][:n] = xp.asarray(last_kill)
    return pop


@pytest.mark.parametrize("with_rtx", [False, True], ids=["no-rituximab", "rituximab"])
@pytest.mark.parametrize("dt_min", [1.0, 900.0])
def test_cell_fates_kernel_matches_twin(dev, dt_min, with_rtx):
    """rules.cell_fates through its device path (one cell_fates launch) takes the decisions of
    the element-wise NumPy form for every cell: dead, divide, the new type and state. The rates
    are the configured ones; dt = 900 min makes every kind of event common; with or without a
    rituximab field (values around its EC50, zeros and small negatives among them); some cells
    just killed (stimulated CAR-T), zeros among the field values."""
    import tissuesim
    from tissuesim.biology import rules

    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "output.progress=false"]))
    imm = sim.immunology
    nt = len(sim.cell_types)
    rs = np.random.default_rng(int(dt_min))
    n = 3000
    pos = rs.random((n, 3)).astype(np.float32)
    typ = rs.integers(0, nt, n).astype(np.uint8)
    state = rs.integers(0, 2, n).astype(np.uint8)
    last_kill = np.where(rs.random(n) < 0.3, 995.0 - 30 * rs.random(n), -1e30).astype(np.float32)
    ifng = np.where(rs.random(n) < 0.2, 0, 3 * rs.random(n)).astype(np.float32)
    dmg = np.where(rs.random(n) < 0.2, 0, rs.random(n)).astype(np.float32)
    u = rs.random((4, n)).astype(np.float32)
    rtx = np.where(rs.random(n) < 0.1, 0, 40 * rs.random(n) - 1).astype(np.float32) if with_rtx else None
    out = []
    for be in (NUMPY, dev.be):
        xp = be.xp
        pop = _fates_population(be, typ, state, last_kill, pos=pos)
        tables = rules.fate_tables(
            nt, dt_min, imm.table.death_per_min, imm.idx, imm.rates, imm.cd20, imm.car_mask, xp
        )
        dead, div = rules.cell_fates(
            pop, xp.asarray(u), dt_min, 1000.0, imm.table.death_per_min, imm.idx, imm.rates,
            xp.asarray(ifng), xp.asarray(dmg), None if rtx is None else xp.asarray(rtx), imm.cd20,
            imm.car_mask, tables=tables,
        )  # fmt: skip
        out.append({k: np.asarray(v).copy() for k, v in
                    (("dead", dead), ("divide", div), ("type", pop.type[:n]), ("state", pop.state[:n]))})  # fmt: skip
    a, b = out
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert len(_launched(dev, "cell_fates")) == 1
    if dt_min > 100:  # every kind of decision happened
        assert (
            a["dead"].any() and a["divide"].any() and (a["type"] != typ).any() and (a["state"] != state).any()
        )


@pytest.mark.parametrize("dt_min", [1.0, 7.0])
def test_cell_fates_kernel_decides_boundary_cases_as_the_twin(dev, dt_min):
    """Cells placed on the edges of every decision, where a kernel that rounds a probability or a
    rate differently, or compares with <= instead of <, decides otherwise: each uniform that
    decides is float32(p) of the twin's own p (death, division or state change; the others
    1 - 2^-24, deciding nothing), and kills exactly one kill window ago, one float32 either side
    of it, or never. Every type and activation state; the rates that depend on the fields are
    probed at 41 field values each, so a rate formed in another precision shows; each probe has
    its own rituximab field value (CD20+ cells die at the hazard it gives)."""
    import tissuesim
    from tissuesim.biology import rules

    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "output.progress=false"]))
    imm = sim.immunology
    rates = imm.rates
    nt = len(sim.cell_types)
    now = np.float32(5000.0)
    w = np.float32(rates["stim_window"])
    edge = np.float32(now - w)
    assert np.float32(now - edge) == w  # exactly one window ago
    kills = np.array(
        [edge, np.nextafter(edge, np.float32(0)), np.nextafter(edge, np.float32(1e9)), -1e30], np.float32
    )
    rs = np.random.default_rng(int(dt_min))
    field_values = [(np.float32(0.37), np.float32(0.61))]
    field_values += [(np.float32(x), np.float32(y)) for x, y in 3 * rs.random((40, 2))]
    tables = rules.fate_tables(
        nt, dt_min, imm.table.death_per_min, imm.idx, rates, imm.cd20, imm.car_mask, np
    )
    typ, state, lk, u, fi, fd, fr = [], [], [], [], [], [], []
    one = np.float32(1 - 2.0**-24)
    for t in range(nt):
        for act in (0, 1):
            kt = 2 * t + act
            for ifng, dmg in field_values if tables.kind[kt] else field_values[:1]:
                rtx = np.float32(7 * ifng)  # ug/mL, about the EC50
                h = rates["rtx_kill"] * np.float64(rtx) / (np.float64(rtx) + rates["rtx_ec50"])
                p_death = rules.prob(tables.death[t] + (h if imm.cd20[t] else 0.0), dt_min)
                r = tables.r_state[kt]  # the twin's per-cell rate: float32 values x Python floats
                if tables.kind[kt] == 1:
                    r = np.float64(rates["b_act"] * dmg)
                elif tables.kind[kt] == 2:
                    r = np.float64(
                        rates["mac_ifng"] * ifng / (ifng + rates["mac_kd"]) + rates["mac_damage"] * dmg
                    )
                p_change = rules.prob(r, dt_min)
                for k in kills:
                    stim = np.float32(now - k) < w
                    p_div = tables.p_div[2 * kt + int(stim)]
                    for which, p in ((0, p_death), (1, p_div), (2, p_change)):
                        uu = [one, one, one, one]
                        uu[which] = np.float32(p)
                        typ.append(t), state.append(act), lk.append(k), u.append(uu)
                        fi.append(ifng), fd.append(dmg), fr.append(rtx)
    n = len(typ)
    typ, state, lk = np.array(typ, np.uint8), np.array(state, np.uint8), np.array(lk, np.float32)
    u = np.array(u, np.float32).T.copy()
    fi, fd, fr = np.array(fi, np.float32), np.array(fd, np.float32), np.array(fr, np.float32)
    out = []
    for be in (NUMPY, dev.be):
        xp = be.xp
        pop = _fates_population(be, typ, state, lk)
        tb = rules.fate_tables(
            nt, dt_min, imm.table.death_per_min, imm.idx, rates, imm.cd20, imm.car_mask, xp
        )
        dead, div = rules.cell_fates(
            pop, xp.asarray(u), dt_min, float(now), imm.table.death_per_min, imm.idx, rates,
            xp.asarray(fi), xp.asarray(fd), xp.asarray(fr), imm.cd20, imm.car_mask, tables=tb,
        )  # fmt: skip
        out.append([np.asarray(a).copy() for a in (dead, div, pop.type[:n], pop.state[:n])])
    for name, a, b in zip(("dead", "divide", "type", "state"), *out):
        assert np.array_equal(a, b), name
    dead = out[0][0]
    assert dead.any()  # some probes sit where float32(p) < p: the rounding of p decides them


def test_cell_fates_kernel_leaves_types_without_tables_alone(dev):
    """A type past the fate tables (which the move flags as FLAG_BAD_TYPE) gets no fate on the
    device and no table is read for it; NumPy raises IndexError on it instead."""
    import tissuesim
    from tissuesim.biology import rules

    sim = tissuesim.Simulation(tissuesim.load_config(["grid=tiny", "backend=numpy", "output.progress=false"]))
    imm = sim.immunology
    nt = len(sim.cell_types)
    typ = np.array([nt, nt + 5, 255], np.uint8)
    u = np.zeros((4, 3), np.float32)  # would decide everything that has a rate

    def fates(be):
        pop = _fates_population(be, typ, np.ones(3, np.uint8))
        tb = rules.fate_tables(
            nt, 900.0, imm.table.death_per_min, imm.idx, imm.rates, imm.cd20, imm.car_mask, be.xp
        )
        dead, div = rules.cell_fates(
            pop, be.xp.asarray(u), 900.0, 10.0, imm.table.death_per_min, imm.idx, imm.rates,
            np.ones(3, np.float32), np.ones(3, np.float32), None, imm.cd20, imm.car_mask, tables=tb,
        )  # fmt: skip
        return pop, dead, div

    pop, dead, div = fates(dev.be)
    assert not np.asarray(dead).any() and not np.asarray(div).any()
    assert np.array_equal(np.asarray(pop.type[:3]), typ) and (np.asarray(pop.state[:3]) == 1).all()
    with pytest.raises(IndexError):
        fates(NUMPY)


def _kill_case(rs, n_plain=600, ntypes=18):
    """Cells, pairs and tables for contact_kills_masked: types 0-3 kill types 4-5 (random
    can_kill); each type from 6 on is one killer with one exclusive target, at the edge of its kill
    test (kill_p = its uniform for the first half, the double above it for the second: the first
    must miss, the second hit). About a third of the plain killers are specific to target type 4
    or 5 (specific_to), the rest attack whatever can_kill allows."""
    from tissuesim.biology import rules

    step, seed, now = 4321, 77, 500.0
    n_edge = ntypes - 6
    n = n_plain + 2 * n_edge
    typ = np.concatenate([rs.integers(0, 6, n_plain), np.arange(6, ntypes), np.full(n_edge, 4)])
    typ = typ.astype(np.uint8)
    pos = (rs.random((n, 3)) * 40).astype(np.float32)
    busy = np.where(rs.random(n) < 0.3, now + 5.0, now - rs.random(n) * 10).astype(np.float32)
    busy[n_plain : n_plain + n_edge] = now  # free (busy_until <= now)
    kills = rs.integers(0, 8, n).astype(np.int32)
    kills[n_plain : n_plain + n_edge] = 0
    last = np.where(rs.random(n) < 0.5, now - 30, -1e30).astype(np.float32)
    can_kill = np.zeros((ntypes, ntypes), bool)
    can_kill[:4, 4:6] = rs.random((4, 2)) < 0.8
    can_kill[6:, 4] = True
    u = rng.draw_uniform(np.arange(n, dtype=np.int64), step, rules.PURPOSE_KILL, 0, seed)[0]
    kill_p = np.concatenate([0.3 + 0.7 * rs.random(6), np.zeros(ntypes - 6)])
    for k in range(n_edge):  # the killer of type 6 + k is row n_plain + k
        uu = np.float64(u[n_plain + k])
        kill_p[6 + k] = uu if k < n_edge // 2 else np.nextafter(uu, 2.0)
    i = rs.integers(0, n_plain, 4 * n_plain).astype(np.int32)
    j = rs.integers(0, n_plain, 4 * n_plain).astype(np.int32)
    edge_i = np.arange(n_plain, n_plain + n_edge, dtype=np.int32)
    edge_j = np.arange(n_plain + n_edge, n, dtype=np.int32)
    pi = np.concatenate([i, edge_i, np.full(50, -1, np.int32)])
    pj = np.concatenate([j, edge_j, np.full(50, -1, np.int32)])
    keep = (pi != pj) | (pi < 0)  # no self-pairs; the -1 padding stays
    spec = rs.choice(np.array([-1, 4, 5], np.int32), n, p=[0.66, 0.17, 0.17])
    spec[n_plain:] = -1
    cells = dict(typ=typ, pos=pos, busy=busy, kills=kills, last=last, spec=spec)
    return cells, pi[keep], pj[keep], can_kill, kill_p, (now, 30.0, 3.0, step, seed), (n_plain, n_edge)


def _kill_population(be, c):
    from tissuesim.biology import rules

    xp = be.xp
    pop = Population(be, capacity=len(c["typ"]) + 5)
    rules.register_cell_attributes(pop)
    n = len(c["typ"])
    pop.add(xp.asarray(c["pos"]), xp.asarray(c["typ"]))
    pop["busy_until"][:n] = xp.asarray(c["busy"])
    pop["kills"][:n] = xp.asarray(c["kills"])
    pop["last_kill"][:n] = xp.asarray(c["last"])
    pop["specific_to"][:n] = xp.asarray(c["spec"])
    return pop


def test_contact_kill_kernels_match_twin(dev):
    """rules.contact_kills_masked on the device (kill_pair_mask, the claim kernels, kill_commit)
    against its element-wise form on NumPy: the same dead targets, engaged killers and busy_until,
    kills and last_kill bit for bit, from a -1-padded pair buffer with killers busy or free and
    exhausted to various degrees. Six killers sit exactly on their kill test (p equal to their
    uniform: a miss) and six one double above it (a hit), so < and <= or another uniform differ."""
    from tissuesim.agents.neighbours import Pairs
    from tissuesim.biology import rules

    rs = np.random.default_rng(11)
    c, pi, pj, can_kill, kill_p, (now, handling, exh, step, seed), (n_plain, n_edge) = _kill_case(rs)
    n = len(c["typ"])
    out = []
    for be in (NUMPY, dev.be):
        xp = be.xp
        pop = _kill_population(be, c)
        dead, engaged = rules.contact_kills_masked(
            pop, Pairs(xp.asarray(pi), xp.asarray(pj), None), xp.asarray(can_kill), xp.asarray(kill_p),
            now, handling, exh, step, seed,
        )  # fmt: skip
        got = {"dead": dead, "engaged": engaged}
        got.update({k: pop[k][:n] for k in ("busy_until", "kills", "last_kill", "type")})
        out.append({k: np.asarray(v).copy() for k, v in got.items()})
    a, b = out
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert len(_launched(dev, "kill_pair_mask")) == 1 and len(_launched(dev, "kill_commit")) == 1
    half = n_edge // 2
    edge_killers = np.arange(n_plain, n_plain + n_edge)
    assert a["engaged"][edge_killers].all()
    hits = a["kills"][edge_killers] == 1
    assert not hits[:half].any() and hits[half:].all()  # p == u misses, p just above u hits
    assert a["dead"][:n_plain].sum() > 20 and (a["engaged"][:n_plain] & ~a["dead"][:n_plain]).any()
    # the specific killers engaged, and none of them killed outside its target type: a dead cell
    # of type 4 (5) had a live claimant allowed on it (checked per pair on NumPy below)
    spec = c["spec"]
    assert a["engaged"][:n_plain][spec[:n_plain] >= 0].sum() > 10
    ok_pairs = (pi >= 0) & (pj >= 0)
    i, j = pi[ok_pairs], pj[ok_pairs]
    t = c["typ"]
    allowed = can_kill[t[i], t[j]] & ((spec[i] < 0) | (spec[i] == t[j]))
    blocked = can_kill[t[i], t[j]] & ~allowed
    assert blocked.sum() > 50  # pairs the specificities rule out exist
    assert not (a["dead"][j[blocked]] & ~np.isin(j[blocked], j[allowed])).any()


def test_contact_kill_kernels_ignore_types_without_tables(dev):
    """A killer or target whose type is past the kill tables neither kills nor is killed on the
    device (and nothing is read out of bounds: the guard bytes); the twin raises IndexError."""
    from tissuesim.agents.neighbours import Pairs
    from tissuesim.biology import rules

    rs = np.random.default_rng(3)
    c, pi, pj, can_kill, kill_p, args, _ = _kill_case(rs, n_plain=40)
    c["typ"][:] = np.where(rs.random(len(c["typ"])) < 0.5, 4, len(kill_p) + 3)  # targets and unknowns
    c["typ"][::7] = 0
    can_kill[:] = True  # only the type guards keep the unknown types out (no table entry says no)
    kill_p[0] = 1.0
    res = {}
    for be in (NUMPY, dev.be):
        xp = be.xp
        pop = _kill_population(be, c)
        pairs = Pairs(xp.asarray(pi), xp.asarray(pj), None)
        call = (pop, pairs, xp.asarray(can_kill), xp.asarray(kill_p), *args)
        if be is NUMPY:
            with pytest.raises(IndexError):
                rules.contact_kills_masked(*call)
            continue
        dead, engaged = rules.contact_kills_masked(*call)
        res = {"dead": np.asarray(dead), "engaged": np.asarray(engaged), "type": c["typ"]}
    known = res["type"] < len(kill_p)
    assert (pi < 0).any() and not res["dead"][~known].any() and not res["engaged"][~known].any()
    assert res["dead"].any()  # the known killers still kill their known targets


def test_extravasate_fill_picks_among_a_million_sites_in_double(dev):
    """With ~1e6 vessel voxels a float32 product u x n_sites picks other voxels than the twin's
    float64 one: 300 arrivals must land in the twin's voxels, bit for bit."""
    from tissuesim.agents import extravasate_many

    grid = Grid((101, 100, 100), dx=10.0)
    n_sites = 1_000_003
    sites = np.arange(n_sites, dtype=np.int64)
    counts = np.array([0, 300], dtype=np.int64)
    pops = []
    for be in (NUMPY, dev.be):
        pop = Population(be, capacity=16)
        extravasate_many(pop, grid, be.xp.asarray(sites), counts, 9, seed=4)
        pops.append(pop)
    a, b = pops
    assert np.asarray(a.position[: a.n]).tobytes() == np.asarray(b.position[: b.n]).tobytes()
    assert len(_launched(dev, "extravasate_fill")) == 1  # the kernel placed them, not a fallback


def test_launch_skips_empty(dev):
    K.launch(dev.be, "philox_fill", 0, ())  # n == 0: no kernel is even looked up
    assert dev.log == []


# --------------------------------------------------------------------------- arrivals

FAR = Grid((3, 5, 4), dx=10.0, origin=(1.0e6 + 0.3, -2.0e6, 3.0e6))  # float32 spacing 0.06-0.25 um


@pytest.mark.parametrize("grid", [*GRIDS, FAR], ids=[*GRID_IDS, "far"])
def test_extravasate_fill_matches_twin(dev, grid):
    """extravasate_many on the device (one extravasate_fill launch per arriving type, one add)
    gives the cells the NumPy loop of extravasate gives: the same ids, types and float32
    positions bit for bit. The far grid sits where float32 spacing is coarse, so points round onto
    a voxel's upper face and take the pull-back."""
    from tissuesim.agents import extravasate_many, vessel_sites

    rs = np.random.default_rng(len(grid.shape) + grid.nx)
    mask = rs.random(grid.shape) < 0.3
    mask.reshape(-1)[[0, -1]] = True  # the first and the last voxel (upper faces of the grid)
    counts = np.array([0, 7, 0, 130, 1], dtype=np.int64)
    pops = []
    for be in (NUMPY, dev.be):
        pop = Population(be, capacity=16)
        pop.add(be.asarray(np.zeros((5, 3), np.float32)), be.asarray(np.zeros(5, np.uint8)))
        sites = vessel_sites(be.asarray(mask), be.xp)
        for step in (3, 4):  # two batches: ids continue, rows append
            assert extravasate_many(pop, grid, sites, counts, step, seed=11) == counts.sum()
        pops.append(pop)
    a, b = pops
    assert a.n == b.n == 5 + 2 * counts.sum()
    for name in ("position", "type", "id", "state", "age", "velocity"):
        assert np.asarray(a[name][: a.n]).tobytes() == np.asarray(b[name][: b.n]).tobytes(), name
    assert len(_launched(dev, "extravasate_fill")) == 2 * np.count_nonzero(counts)
    if grid is FAR:  # the pull-back was taken: some coordinate sits one float below a face
        pos = np.asarray(a["position"][5 : a.n], dtype=np.float64)
        o, dx = np.array(grid.origin), grid.dx
        faces = (np.floor((pos - o) / dx) + 1) * dx + o
        below = np.nextafter(faces.astype(np.float32), np.float32(-np.inf))
        assert (pos == below).any()
