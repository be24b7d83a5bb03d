"""FieldSet: conservation, budget accounting, solver choice and stability errors, API contracts."""

from __future__ import annotations

import numpy as np
import pytest

from tissuesim.fields import (
    FieldSet,
    FieldSpec,
    diffuse_explicit,
    explicit_stable_dt,
    ops,
    substeps_needed,
)
from tissuesim.grid import Grid

_STEP_GRAPH = FieldSet._step_graph  # emulated_cupy replaces it; one test puts it back


def _random_multiplier(rng, shape, zeros=True):
    m = rng.uniform(0.2, 1.8, shape)
    if zeros:
        m[rng.random(shape) < 0.05] = 0.0  # impermeable voxels
    return m


@pytest.mark.parametrize("solver", ["explicit", "lod"])
def test_zero_flux_conserves_mass(be, solver):
    """float64, 3D 6x8x10, variable D with impermeable voxels, one periodic axis (y); 1000 steps.
    The total may change by < 1e-10 relative (a sign slip in any face term breaks this)."""
    rng = np.random.default_rng(1)
    grid = Grid((6, 8, 10), dx=10.0)
    specs = [
        FieldSpec("a", 100.0, solver=solver),
        FieldSpec("b", 30.0, solver=solver, bc={"y-": "periodic", "y+": "periodic"}),
    ]
    mult = {"a": _random_multiplier(rng, grid.shape), "b": _random_multiplier(rng, grid.shape)}
    dt = 0.1 if solver == "explicit" else 2.0  # explicit: 1 substep (limit 0.167 min)
    fs = FieldSet(be, grid, specs, D_multiplier=mult, dtype="float64", dt=dt)
    fs.values[...] = be.asarray(rng.random(fs.values.shape))
    u0 = be.asnumpy(fs.values).copy()
    tot0 = u0.reshape(2, -1).sum(axis=1)
    for _ in range(1000):
        fs.step()
    u = be.asnumpy(fs.values)
    rel = np.abs(u.reshape(2, -1).sum(axis=1) - tot0) / tot0
    assert np.all(rel < 1e-10), rel
    assert np.abs(u - u0).max() > 0.05  # it did diffuse
    for b in fs.budget().values():
        assert abs(b["imbalance"]) < 1e-10 * b["total"]


@pytest.mark.parametrize("solver", ["explicit", "lod"])
def test_budget_balances_with_dirichlet_vessels_sources(be, solver):
    """float64, 2D 16x20: Dirichlet on x- (1.0) and y+ (0.3), vessels (c_blood 2.0), source,
    uptake and decay, 300 steps (explicit: 3 substeps each). change of total == in - out to round-off, and every term is
    non-trivial (so each accumulator is really checked)."""
    rng = np.random.default_rng(2)
    grid = Grid((1, 16, 20), dx=10.0)
    bc = {"x-": 1.0, "y+": ("dirichlet", 0.3)}
    specs = [
        FieldSpec("a", 100.0, decay_per_min=0.01, solver=solver, bc=bc),
        FieldSpec("d", 0.0, decay_per_min=0.02),  # no diffusion: reactions only
    ]
    vr = np.where(rng.random(grid.shape) < 0.1, 0.5, 0.0)
    dt = 0.6 if solver == "explicit" else 1.0  # explicit: 3 substeps
    fs = FieldSet(
        be,
        grid,
        specs,
        D_multiplier={"a": _random_multiplier(rng, grid.shape)},
        vessel_rate=vr,
        dtype="float64",
        dt=dt,
    )
    fs.values[...] = be.asarray(rng.random(fs.values.shape))
    src = be.asarray(0.01 * rng.random(fs.values.shape))
    upt = be.asarray(0.02 * rng.random(fs.values.shape))
    cb = be.asarray(np.array([2.0, 0.5]))
    for _ in range(300):
        fs.step(source=src, uptake=upt, c_blood=cb)
    b = fs.budget()
    for name in ("a", "d"):
        t = b[name]
        scale = max(abs(t[k]) for k in ("change", "vessel_in", "source_in", "decay_out", "uptake_out"))
        assert abs(t["imbalance"]) < 1e-11 * scale, (name, t)
        for term in ("vessel_in", "source_in", "decay_out", "uptake_out"):
            assert abs(t[term]) > 1e-3 * scale, (name, term, t)
    assert abs(b["a"]["dirichlet_in"]) > 1e-3 * abs(b["a"]["source_in"])
    assert b["d"]["dirichlet_in"] == 0.0


def test_reaction_is_exact_exponential(be):
    """No diffusion, uniform: du/dt = S - (k + lam + vr) u + vr c_b has the closed form
    u_inf + (u0 - u_inf) e^{-a t}; one step of any length must reproduce it (float64, 1e-12)."""
    grid = Grid((1, 4, 5), dx=10.0)
    k, lam, vr, cb, S, u0, t = 0.05, 0.1, 0.3, 2.0, 0.4, 1.5, 7.0
    fs = FieldSet(
        be,
        grid,
        [FieldSpec("d", 0.0, decay_per_min=k)],
        vessel_rate=np.full(grid.shape, vr),
        dtype="float64",
        dt=t,
    )
    fs.values[...] = u0
    shape = fs.values.shape
    fs.step(
        source=be.asarray(np.full(shape, S)),
        uptake=be.asarray(np.full(shape, lam)),
        c_blood=be.asarray(np.array([cb])),
    )
    a = k + lam + vr
    u_inf = (S + vr * cb) / a
    ref = u_inf + (u0 - u_inf) * np.exp(-a * t)
    np.testing.assert_allclose(be.asnumpy(fs.values), ref, rtol=1e-12)


def test_stable_dt_formula_is_the_real_limit():
    """A checkerboard on a periodic 2D grid is the most unstable mode: one forward-Euler substep
    multiplies it by 1 - 8 D h/dx^2, so |factor| < 1 just below explicit_stable_dt and > 1 above."""
    D, dx = 50.0, 4.0
    lim = explicit_stable_dt(D, dx, ndim=2)
    assert lim == pytest.approx(dx**2 / (4 * D))
    assert explicit_stable_dt(D, dx, ndim=3, k=0.5) == pytest.approx(1 / (6 * D / dx**2 + 0.5))
    n = 8
    cb = np.indices((n, n)).sum(axis=0) % 2 * 2.0 - 1.0
    u = cb.reshape(1, 1, n, n).astype(np.float64)
    Df = np.full_like(u, D)
    kinds = np.full((1, 6), ops.BC_PERIODIC, dtype=np.int32)
    kinds[0, 4:] = ops.BC_ZERO_FLUX
    vals = np.zeros((1, 6))
    slots = np.zeros(1, dtype=np.int32)
    for frac, grows in ((0.95, False), (1.05, True)):
        out = np.empty_like(u)
        ops.explicit_substep_numpy(u, out, Df, slots, kinds, vals, frac * lim / dx**2)
        factor = np.abs(out).max()
        assert (factor > 1) == grows, (frac, factor)
    assert substeps_needed(1.0, D, dx, 2) == int(np.ceil(1.0 / lim))
    assert substeps_needed(lim, D, dx, 2) == 1
    assert substeps_needed(1.0, 0.0, dx, 2) == 0


def test_explicit_substeps_keep_max_principle(be):
    """dt = 20x the stable limit, random data, variable D: automatic substeps keep the solution
    inside [min, max] of the start (a single unstable step would blow far outside)."""
    rng = np.random.default_rng(3)
    u = rng.random((5, 12, 14))
    D = 80.0 * _random_multiplier(rng, u.shape)
    dt = 20 * explicit_stable_dt(D.max(), 10.0, 3)
    out = be.asnumpy(diffuse_explicit(be.asarray(u), be.asarray(D), 10.0, dt))
    assert out.min() >= u.min() - 1e-12 and out.max() <= u.max() + 1e-12
    assert np.abs(out - u).max() > 0.05


@pytest.mark.parametrize("shape", [(5, 12, 14), (1, 12, 14), (4, 1, 9)])
def test_explicit_substeps_keep_max_principle_with_dirichlet_faces(be, shape):
    """Dirichlet values on every face (a length-1 axis: both on its one voxel), in [0, 1] like the
    checkerboard start, uniform D, dt exactly 9 substeps at the FieldSet's limit: every value
    stays in [0, 1].
    At the bare 2 ndim limit the coefficient of a voxel's own value on a Dirichlet face is
    1 - (2 ndim + 1) / (2 ndim) < 0 (a review measured -0.25 after one step from 1 beside a 0
    face), so values left [0, 1]."""
    bc = {"x-": 0.0, "x+": 1.0, "y-": 0.0, "y+": 0.0}
    if shape[0] > 1:
        bc.update({"z-": 0.0, "z+": 1.0})
    spec = FieldSpec("c", 80.0, solver="explicit", bc=bc)
    fs = FieldSet(be, Grid(shape, dx=10.0), [spec], dtype="float64", track_budget=False)
    dt = 9 * fs.stable_dt("c")
    assert fs.plan(dt).substeps["c"] == 9
    # a checkerboard with 1 in the corner voxel: there, 0 on every face next to it (the worst case)
    k, j, i = np.indices(shape)
    fs.values[...] = be.asarray(((i + j + k) % 2 == 0).astype(float)[None])
    for _ in range(3):
        fs.step(dt)
        u = be.asnumpy(fs["c"])
        assert u.min() >= -1e-12 and u.max() <= 1 + 1e-12, (u.min(), u.max())


def test_too_few_substeps_is_a_clear_error(be):
    grid = Grid((1, 16, 16), dx=10.0)
    spec = FieldSpec("il6", 1000.0, solver="explicit", max_substeps=2)
    with pytest.raises(ValueError) as err:
        FieldSet(be, grid, [spec], dt=1.0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "'il6'" in msg and "dt=1 " in msg and "stable limit 0.025 min" in msg and "max_substeps=2" in msg
    # allowed when the budget suffices, and the step really takes the substeps
    fs = FieldSet(be, grid, [FieldSpec("il6", 1000.0, solver="explicit", max_substeps=40)], dt=1.0)
    assert fs.plan(1.0).substeps["il6"] == 40
    # and step() with a new dt re-checks
    with pytest.raises(ValueError, match="il6"):
        fs.step(2.0)


def test_auto_picks_lod_when_stiff(be):
    grid = Grid((1, 16, 16), dx=10.0)
    specs = [
        FieldSpec("ifng", 5000.0),  # stiff: 200 substeps at dt = 1
        FieldSpec("autoantibody", 20.0),  # 1 substep
        FieldSpec("damage", 0.0, decay_per_min=1e-4),
    ]
    fs = FieldSet(be, grid, specs, dt=1.0)
    assert fs.solver_for("ifng") == "lod"
    assert fs.solver_for("autoantibody") == "explicit"
    assert fs.solver_for("damage") == "none"
    assert fs.solver_for("ifng", dt=0.005) == "explicit"  # 1 substep
    # D == 0 everywhere via the multiplier also skips diffusion
    fs2 = FieldSet(be, grid, specs[:1], D_multiplier={"ifng": np.zeros(grid.shape)}, dt=1.0)
    assert fs2.solver_for("ifng") == "none"


def test_api_contracts(be):
    grid = Grid((3, 4, 5), dx=10.0)
    specs = [FieldSpec("cxcl13", 100.0, 0.02), FieldSpec("damage", 0.0)]
    fs = FieldSet(be, grid, specs, dt=0.1)
    assert fs.values.shape == (2, 3, 4, 5) and fs.values.dtype == np.float32
    assert fs.index("damage") == 1
    fs["cxcl13"][1, 2, 3] = 7.0  # a view: writes land in values
    assert float(be.asnumpy(fs.values)[0, 1, 2, 3]) == 7.0
    with pytest.raises(KeyError):
        fs.index("il6")
    with pytest.raises(ValueError, match="solver"):
        FieldSpec("x", 1.0, solver="crank")
    with pytest.raises(ValueError, match="periodic"):
        FieldSet(be, grid, [FieldSpec("x", 1.0, bc={"x-": "periodic"})])
    with pytest.raises(ValueError, match="z-"):
        FieldSet(be, Grid((1, 4, 5)), [FieldSpec("x", 1.0, bc={"z-": 1.0})])
    with pytest.raises(ValueError, match="shape"):
        FieldSet(be, grid, specs, D_multiplier={"cxcl13": np.ones((3, 4))})
    fs.step(source=be.xp.ones((2, 3, 4, 5), dtype=be.xp.float32))
    with pytest.raises(ValueError, match="shape"):
        fs.step(source=be.xp.ones((3, 4, 5), dtype=be.xp.float32))
    f64 = FieldSet(be, grid, specs, dtype="float64", dt=0.1)
    assert f64.values.dtype == np.float64


@pytest.mark.parametrize("order", ["dab", "adb"])
@pytest.mark.parametrize("n_sub", [1, 2, 3, 4])
def test_fieldset_explicit_substeps_match_plain_function(be, n_sub, order):
    """FieldSet ping-pongs between values and a scratch buffer (an extra copy of the group's
    fields when the substep count is odd) so the result lands in ``values``; it must equal
    diffuse_explicit exactly, for odd and even counts, for a group whose slots are consecutive
    ("dab": one slice copy) or not ("adb": slot by slot), and leave the non-diffusing field alone."""
    rng = np.random.default_rng(5)
    grid = Grid((4, 9, 11), dx=10.0)
    lim = explicit_stable_dt(60.0, 10.0, 3, weight=7)  # one Dirichlet face per field: W = 2 ndim + 1
    dt = lim * (n_sub - 0.5)
    spec = {
        "d": FieldSpec("d", 0.0),
        "a": FieldSpec("a", 60.0, solver="explicit", bc={"z+": 1.0, "x-": "periodic", "x+": "periodic"}),
        "b": FieldSpec("b", 60.0, solver="explicit", bc={"y-": 0.5}),
    }
    specs = [spec[c] for c in order]
    fs = FieldSet(be, grid, specs, dtype="float64", dt=dt, track_budget=False)
    assert fs.plan(dt).substeps["a"] == fs.plan(dt).substeps["b"] == n_sub
    u0 = rng.random(fs.values.shape)
    fs.values[...] = be.asarray(u0)
    views = {c: fs[c] for c in order}
    fs.step()
    for i, c in enumerate(order):
        if c == "d":
            np.testing.assert_array_equal(be.asnumpy(views[c]), u0[i])
            continue
        s = spec[c]
        ref = diffuse_explicit(u0[i], s.diffusion_um2_per_min, 10.0, dt, bc=s.bc)
        np.testing.assert_allclose(be.asnumpy(views[c]), ref, rtol=1e-13, atol=1e-13, err_msg=c)


@pytest.mark.parametrize("line", ["long", "one voxel"])
@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_cached_lapack_lod_equals_line_by_line_thomas(axis, line):
    """The cached block-tridiagonal LAPACK sweep equals a plain Thomas solve per line, also on an
    axis one voxel long, where both faces' Dirichlet terms fall on the same voxel."""
    from tissuesim.fields import ops

    rng = np.random.default_rng(4)
    nf, shape = 3, [5, 6, 7]
    if line == "one voxel":
        shape[ops._AXES[axis][0]] = 1
    shape = tuple(shape)
    u = rng.random((nf, *shape))
    D = rng.random((nf, *shape)) * 50
    D[1, 0, 0, :] = 0.0  # impermeable voxels
    bc_kind = np.zeros((nf, 6), np.int32)
    bc_val = rng.random((nf, 6))
    bc_kind[0, :] = ops.BC_DIRICHLET
    bc_kind[2, 1] = ops.BC_DIRICHLET
    slots = np.array([0, 2], np.int32)
    got = u.copy()
    ops.lod_sweep_numpy(got, D, slots, bc_kind, bc_val, axis, 0.3)
    ops.lod_sweep_numpy(got, D, slots, bc_kind, bc_val, axis, 0.3)  # second call: cached factors
    ax, f = ops._AXES[axis]
    want = u.copy()
    for _ in range(2):
        for s in slots:
            v = np.moveaxis(want[s], ax, 0)
            d = np.moveaxis(D[s], ax, 0)
            a, b, c, rhs, _ = ops.lod_line_coefficients(
                d, 0.3, bc_kind[s, f], bc_val[s, f], bc_kind[s, f + 1], bc_val[s, f + 1], v
            )
            v[...] = ops.thomas_numpy(a, b, c, rhs)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got[1], u[1])  # slots not listed are untouched


def test_cached_factors_are_tied_to_the_D_object_not_its_id():
    """A new D array that reuses a dropped one's id must not pick up the old factors.

    Reuse of ids is simulated by re-keying the cache entry of D1 under D2's id."""
    from tissuesim.fields import ops

    rng = np.random.default_rng(2)
    u0 = rng.random((1, 1, 6, 9))
    D1 = np.full((1, 1, 6, 9), 10.0)
    D2 = np.full((1, 1, 6, 9), 900.0)
    kind = np.zeros((1, 6), np.int32)
    val = np.zeros((1, 6))
    slots = np.array([0], np.int32)
    ops._LAPACK_CACHE.clear()
    ops.lod_sweep_numpy(u0.copy(), D1, slots, kind, val, "x", 0.5)
    (k1,) = list(ops._LAPACK_CACHE)
    ops._LAPACK_CACHE[(id(D2), *k1[1:])] = ops._LAPACK_CACHE.pop(k1)
    got = u0.copy()
    ops.lod_sweep_numpy(got, D2, slots, kind, val, "x", 0.5)
    ops._LAPACK_CACHE.clear()
    want = u0.copy()
    ops.lod_sweep_numpy(want, D2, slots, kind, val, "x", 0.5)
    np.testing.assert_array_equal(got, want)


def test_cuda_graph_replay_equals_plain_launches(gpu_be):
    """FieldSet.step as a CUDA graph (the default on CuPy) gives bit for bit the plain launches,
    with the source changed in place and c_blood changed between steps, a dt change (recapture)
    and explicit, LOD and non-diffusing fields together."""
    grid = Grid((12, 20, 24), 10.0)
    specs = [
        FieldSpec("a", 300.0, 0.01, solver="explicit"),  # 18 substeps
        FieldSpec("b", 6000.0, 0.002, solver="lod"),
        FieldSpec("c", 0.0, 0.001),
    ]
    rs = np.random.default_rng(3)
    vessel = (rs.random(grid.shape) < 0.05).astype(np.float32) * 0.1
    u0 = rs.random((len(specs), *grid.shape)).astype(np.float32)
    sims = []
    for graph in (False, True):
        fs = FieldSet(gpu_be, grid, specs, vessel_rate=vessel, dt=1.0, track_budget=False)
        fs.use_graph = graph
        fs.values[...] = gpu_be.asarray(u0)
        sims.append((fs, gpu_be.xp.zeros_like(fs.values)))
    for k in range(12):
        src = rs.random(sims[0][0].values.shape).astype(np.float32) * 0.01
        cb = rs.random(3)
        dt = 1.0 if k < 8 else 0.5
        for fs, source in sims:
            source[...] = gpu_be.asarray(src)
            fs.step(dt, source=source, c_blood=gpu_be.asarray(cb))
    a, b = (gpu_be.asnumpy(fs.values) for fs, _ in sims)
    assert sims[1][0]._graph is not None and sims[1][0].use_graph, "the graph was not used"
    assert a.tobytes() == b.tobytes()
    assert sims[0][0].time == sims[1][0].time == 8 * 1.0 + 4 * 0.5


def _kept_arrays(fs) -> list:
    """(what, array) for every device array a FieldSet keeps from one step to the next besides
    the ones it was made with: the plans' slot arrays, the ping-pong buffer, the LOD scratch and
    the transposed D."""
    kept = [("ping-pong buffer", fs._tmp)]
    for dt, p in fs._plans.items():
        entries = [(s, f) for _n, s, f in p.explicit] + ([p.lod] if p.lod else [])
        for slots, faces in entries:
            kept += [(f"plan {dt} slots", slots)] + [(f"plan {dt} face {k}", a) for k, a in faces.items()]
    w = fs._lod_work
    if w is not None:
        kept += [("LOD cp", w.cp), ("LOD zs", w.zs), ("LOD ut", w.ut)]
        kept += [("LOD transposed D", a) for a in w.Dt.values()]
    return [(what, a) for what, a in kept if a is not None]


def _graph_specs():
    return [
        FieldSpec("a", 300.0, 0.01, solver="explicit"),
        FieldSpec("b", 6000.0, 0.002, solver="lod", bc={"x-": ("dirichlet", 1.0)}),
        FieldSpec("c", 0.0, 0.001),
    ]


def test_graph_captures_keep_no_lasting_array_in_their_private_pool(emulated_cupy, monkeypatch):
    """The arrays a FieldSet keeps between steps must not come from a graph's private memory
    pool: CuPy frees a pool's memory when the pool goes, under live arrays, and the pool goes at
    the next capture (a dt change here), after which the graph would read freed memory. CUDA
    graphs need a GPU, so a stand-in ``cupy`` records which pool each array was made under
    (through emulated_cupy's array module) and replays a graph as the plain step."""
    import contextlib
    import sys
    import types

    from tissuesim.fields import fieldset

    monkeypatch.setattr(fieldset.FieldSet, "_step_graph", _STEP_GRAPH)  # emulated_cupy bypasses it
    xp = emulated_cupy.xp
    current: list = []

    class Pool:
        def malloc(self, nbytes):
            raise AssertionError("not called: arrays are NumPy's")

    @contextlib.contextmanager
    def using_allocator(malloc):
        current.append(malloc.__self__)
        try:
            yield
        finally:
            current.pop()

    made_in: dict[int, object] = {}  # id(array) -> the pool it was made under (or None)
    alive: list = []  # keeps every made array, so no id is reused

    def tagging(make):
        def made(*a, **k):
            src = a[0] if a else None
            out = make(*a, **k)
            if out is not src:  # a new array: remember the pool it came from
                made_in[id(out)] = current[-1] if current else None
                alive.append(out)
            return out

        return made

    for name in ("empty", "empty_like", "zeros", "zeros_like", "asarray", "arange", "ones"):
        monkeypatch.setattr(xp, name, tagging(getattr(xp, name)))
    replays = []

    class Stream(type(xp.cuda.get_current_stream())):  # emulated_cupy's stream, capturing
        def begin_capture(self, mode):
            pass

        def end_capture(self):
            return types.SimpleNamespace(launch=lambda stream: replays.append(1))

    cuda = types.SimpleNamespace(
        MemoryPool=Pool,
        using_allocator=using_allocator,
        Stream=Stream,
        get_current_stream=xp.cuda.get_current_stream,
        runtime=types.SimpleNamespace(streamCaptureModeRelaxed=1),
    )
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    grid = Grid((1, 12, 10), 10.0)
    fs = FieldSet(emulated_cupy, grid, _graph_specs(), dt=1.0, track_budget=False)
    assert fs.use_graph
    for dt in (1.0, 1.0, 0.5, 0.5, 0.25):  # three captures; the first two pools are gone
        fs.step(dt, c_blood=xp.asarray(np.ones(3)))
    assert len(replays) == 2 and fs._graph is not None
    kept = _kept_arrays(fs)
    assert {"ping-pong buffer", "LOD cp"} <= {w for w, _ in kept}
    for what, a in kept:
        assert id(a) in made_in, f"{what}: not made through the array module"
        assert made_in[id(a)] is None, f"{what} was made in a graph's private pool"


def test_graph_recaptures_leave_the_kept_arrays_alive(gpu_be):
    """On the GPU: after captures at three step lengths (the private pools of the first two are
    gone), every array the FieldSet keeps still has its memory pool, and the graph run still
    equals plain launches (bit for bit)."""
    import gc

    grid = Grid((6, 12, 10), 10.0)
    rs = np.random.default_rng(5)
    u0 = rs.random((3, *grid.shape)).astype(np.float32)
    out = []
    for graph in (True, False):
        fs = FieldSet(gpu_be, grid, _graph_specs(), dt=1.0, track_budget=False)
        fs.use_graph = graph
        fs.values[...] = gpu_be.asarray(u0)
        for dt in (1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25):
            fs.step(dt, c_blood=gpu_be.asarray(np.ones(3)))
        gc.collect()
        if graph:
            for what, a in _kept_arrays(fs):
                pool = getattr(a.data.mem, "pool", None)
                assert pool is None or pool() is not None, f"{what}: its memory pool is gone"
        out.append(gpu_be.asnumpy(fs.values))
    assert out[0].tobytes() == out[1].tobytes()


@pytest.mark.parametrize("solver", ["explicit", "lod"])
def test_dirichlet_faces_of_a_one_voxel_axis_both_act(be, solver):
    """A 3D patch one voxel deep along y, Dirichlet 1 on y- and 3 on y+ (zero flux elsewhere):
    each voxel sits half a voxel from both faces, so the steady state is their mean, 2."""
    grid = Grid((3, 1, 4), dx=10.0)
    spec = FieldSpec("c", 100.0, solver=solver, bc={"y-": 1.0, "y+": 3.0})
    dt = 0.2 if solver == "explicit" else 5.0
    fs = FieldSet(be, grid, [spec], dtype="float64", dt=dt, track_budget=False)
    for _ in range(400):
        fs.step()
    np.testing.assert_allclose(be.asnumpy(fs["c"]), 2.0, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("share", [0.02, 0.6], ids=["few-voxels", "most-voxels"])
@pytest.mark.parametrize("plane", [(30, 20), (150, 120)], ids=["one-block", "two-blocks"])
def test_reaction_with_uptake_in_some_voxels_equals_its_formula(dtype, share, plane):
    """ops.react_numpy with uptake (lambda > 0) in a share of the voxels, which takes the cached
    exponentials of k + vessel rate and recomputes them only there, block by block (or everywhere
    when most voxels take up): every voxel equals u e^{-a h} + b h phi1(a h), a = k + lambda + vr,
    b = S + vr c_b, evaluated here on the whole grid; with the budget term too; a grid of one work
    block and one of two (ops.REACT_BLOCK voxels each)."""
    from tissuesim.fields import ops

    rs = np.random.default_rng(int(share * 100))
    shape = (3, 2, *plane)
    assert (2 * plane[0] * plane[1] > ops.REACT_BLOCK) == (plane[0] > 100)
    u = rs.random(shape).astype(dtype)
    lam = np.where(rs.random(shape) < share, rs.random(shape), 0).astype(dtype)
    lam[2] = 0  # a field without uptake beside two with
    k = np.array([0.01, 0.02, 0.03])
    vr = (0.01 * (rs.random(shape[1:]) < 0.1)).astype(dtype)
    src = (0.1 * rs.random(shape)).astype(dtype)
    cb = np.array([1.0, 0.5, 0.0])
    h = 7.0
    for budget in (False, True):
        got = u.copy()
        U = np.zeros_like(u) if budget else None
        ops.react_numpy(got, np.arange(3), k, lam, src, vr, cb, h, U=U)
        want = np.empty_like(u)
        for s in range(3):
            a = k[s] + lam[s].astype(np.float64) + vr.astype(np.float64)
            b = src[s].astype(np.float64) + vr.astype(np.float64) * cb[s]
            want[s] = u[s] * np.exp(-a * h) + b * h * ops.phi1(a * h)
        np.testing.assert_array_equal(got, want)
