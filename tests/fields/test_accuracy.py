"""Verification of the diffusion schemes against analytic solutions (both backends via ``be``).

Units: um, min. Every test states its resolution; thresholds are set from measured errors with
margin, and each would fail for the bug it names (wrong stencil, wrong face mean, wrong boundary
ghost, first- instead of second-order space, no cyclic correction, ...).
"""

from __future__ import annotations

import platform

import numpy as np
import pytest

from tissuesim.backend import NUMPY
from tissuesim.fields import FieldSet, FieldSpec, diffuse_explicit, diffuse_lod
from tissuesim.grid import Grid


def gauss1d(x, x0, var):
    return np.exp(-((x - x0) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)


def neumann_images_1d(x, x0, var, L, n_images=2):
    """Heat kernel on [0, L] with zero-flux walls: mirror images at 2mL +- x0."""
    out = np.zeros_like(x)
    for m in range(-n_images, n_images + 1):
        out += gauss1d(x, x0 + 2 * m * L, var) + gauss1d(x, -x0 + 2 * m * L, var)
    return out


def periodic_images_1d(x, x0, var, L, n_images=3):
    """Heat kernel on a ring of length L: images at x0 + mL."""
    out = np.zeros_like(x)
    for m in range(-n_images, n_images + 1):
        out += gauss1d(x, x0 + m * L, var)
    return out


def heat_kernel(shape, dx, centre, var, kind="neumann"):
    """Product heat kernel on a cell-centred grid (nz, ny, nx) of edge dx (float64).

    centre : (x0, y0, z0) um; var : 2 D t (um^2); z is ignored when nz == 1.
    kind : 'neumann' (zero-flux box) or 'periodic'.
    """
    nz, ny, nx = shape
    f1 = neumann_images_1d if kind == "neumann" else periodic_images_1d
    gx = f1((np.arange(nx) + 0.5) * dx, centre[0], var, nx * dx)
    gy = f1((np.arange(ny) + 0.5) * dx, centre[1], var, ny * dx)
    g = gy[:, None] * gx[None, :]
    if nz == 1:
        return g[None]
    gz = f1((np.arange(nz) + 0.5) * dx, centre[2], var, nz * dx)
    return gz[:, None, None] * g[None]


def rel_l2(a, b):
    return float(
        np.linalg.norm((np.asarray(a) - np.asarray(b)).ravel()) / np.linalg.norm(np.asarray(b).ravel())
    )


def slope(xs, ys):
    """Least-squares slope of log(ys) against log(xs)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


D = 100.0  # um^2/min


def _gauss_problem(shape, dx, t0=10.0, T=10.0, kind="neumann", centre=None):
    nz, ny, nx = shape
    if centre is None:
        centre = (nx * dx / 2, ny * dx / 2, nz * dx / 2)
    u0 = heat_kernel(shape, dx, centre, 2 * D * t0, kind)
    ref = heat_kernel(shape, dx, centre, 2 * D * (t0 + T), kind)
    return u0, ref


def _run(be, solver, u0, dx, T, dt, bc=None, dtype=np.float64):
    u = be.asarray(u0.astype(dtype))
    n = round(T / dt)
    for _ in range(n):
        if solver == "explicit":
            u = diffuse_explicit(u, D, dx, dt, bc=bc)
        else:
            u = diffuse_lod(u, D, dx, dt, bc=bc)
    return be.asnumpy(u)


@pytest.mark.parametrize("solver", ["explicit", "lod"])
def test_gaussian_2d_matches_heat_kernel(be, solver):
    """2D, dx = 5 um (sigma0 = 9 voxels), 128^2, T = 10 min; LOD dt = 0.25 min."""
    shape, dx = (1, 128, 128), 5.0
    u0, ref = _gauss_problem(shape, dx)
    dt = 10.0 if solver == "explicit" else 0.25
    err = rel_l2(_run(be, solver, u0, dx, 10.0, dt), ref)
    assert err < 0.01, f"{solver}: relative L2 error {err:.3e}"
    # the solution moved: a do-nothing solver would be off by far more
    assert rel_l2(u0, ref) > 0.2


@pytest.mark.parametrize("solver", ["explicit", "lod"])
def test_gaussian_3d_matches_heat_kernel(be, solver):
    """3D, dx = 10 um (sigma0 = 4.5 voxels), 40^3, T = 10 min; LOD dt = 0.25 min."""
    shape, dx = (40, 40, 40), 10.0
    u0, ref = _gauss_problem(shape, dx)
    dt = 10.0 if solver == "explicit" else 0.25
    err = rel_l2(_run(be, solver, u0, dx, 10.0, dt), ref)
    assert err < 0.01, f"{solver}: relative L2 error {err:.3e}"
    assert rel_l2(u0, ref) > 0.3


def test_explicit_spatial_order_two(be):
    """Explicit scheme, dx = 10, 5, 2.5 um on a fixed 640 um box (substeps h ~ dx^2, so the
    time error scales the same way): the fitted order of the L2 error must be ~2."""
    errs, dxs = [], [10.0, 5.0, 2.5]
    for dx in dxs:
        n = round(640 / dx)
        u0, ref = _gauss_problem((1, n, n), dx)
        errs.append(rel_l2(_run(be, "explicit", u0, dx, 10.0, 10.0), ref))
    p = slope(dxs, errs)
    assert 1.8 <= p <= 2.2, f"spatial order {p:.3f}, errors {errs}"


def test_lod_temporal_order_one(be):
    """LOD, 2D 64^2, dx = 10 um, T = 8 min, dt = 1, 0.5, 0.25 min. The time error of u(dt) is
    estimated by |u(dt) - u(dt/2)| (Richardson), free of the shared spatial error; its fitted
    order must be ~1."""
    shape, dx, T = (1, 64, 64), 10.0, 8.0
    u0, _ = _gauss_problem(shape, dx, T=T)
    dts = [1.0, 0.5, 0.25, 0.125]
    sol = [_run(be, "lod", u0, dx, T, dt) for dt in dts]
    diffs = [np.linalg.norm(sol[i] - sol[i + 1]) / np.linalg.norm(sol[-1]) for i in range(3)]
    p = slope(dts[:3], diffs)
    assert 0.8 <= p <= 1.2, f"temporal order {p:.3f}, differences {diffs}"


@pytest.mark.parametrize("solver", ["explicit", "lod"])
def test_periodic_gaussian_crosses_boundary(be, solver):
    """Periodic x and y, 2D 64^2, dx = 10 um: a Gaussian centred 30 um from the x- face and
    near the y+ face spreads across both; compare with the periodic image sum."""
    shape, dx = (1, 64, 64), 10.0
    bc = {"x-": "periodic", "x+": "periodic", "y-": "periodic", "y+": "periodic"}
    u0, ref = _gauss_problem(shape, dx, T=10.0, kind="periodic", centre=(30.0, 600.0, 0.0))
    dt = 10.0 if solver == "explicit" else 0.25
    u = _run(be, solver, u0, dx, 10.0, dt, bc=bc)
    err = rel_l2(u, ref)
    assert err < 0.01, f"{solver}: relative L2 error {err:.3e}"
    # mass wrapped through the face: the zero-flux answer would be far off
    zero_flux = _run(NUMPY, solver, u0, dx, 10.0, dt)
    assert rel_l2(zero_flux, ref) > 5 * err


def test_explicit_and_lod_agree_within_error_estimates(be):
    """Same 2D problem (64^2, dx = 10 um, T = 8 min): both schemes share the spatial
    discretisation, so they differ only by time error. Each time error is estimated by step
    halving (first order: e(dt) ~ 2 |u(dt) - u(dt/2)|); the difference must lie within them."""
    shape, dx, T = (1, 64, 64), 10.0, 8.0
    u0, _ = _gauss_problem(shape, dx, T=T)
    lod1 = _run(be, "lod", u0, dx, T, 0.5)
    lod2 = _run(be, "lod", u0, dx, T, 0.25)
    ex1 = _run(be, "explicit", u0, dx, T, 8.0)  # substeps h = 0.25 min (the stable limit)
    ex2 = _run(be, "explicit", u0, dx, T, 0.125)  # h = 0.125 min
    norm = np.linalg.norm(lod2)
    est = 2 * (np.linalg.norm(lod1 - lod2) + np.linalg.norm(ex1 - ex2)) / norm
    diff = np.linalg.norm(lod1 - ex1) / norm
    assert diff <= 1.5 * est, f"difference {diff:.3e} > 1.5 x estimate {est:.3e}"
    assert est < 0.02


@pytest.mark.parametrize("solver", ["explicit", "lod"])
def test_steady_decay_profile(be, solver):
    """1D-like (1, 1, nx) strip: Dirichlet 1 at x-, zero-flux x+ (far: 12 decay lengths), D = 100,
    k = 0.1/min -> u = exp(-x / sqrt(D/k)), x from the face. Started from 0, run 150 min
    (15/k). explicit: dx = 2 um, dt = 0.02 min; lod: dx = 4 um, dt = 0.05 min.

    Measured (numpy, float64): explicit max |u - ref| 0.9e-3, fitted decay length -0.008 %;
    lod max |u - ref| 1.8e-3, decay length +0.19 % (1.2e-3 / +0.008 % and 6.4e-3 / +0.19 % when
    the reaction came after the diffusion). The errors are dominated by the Lie splitting (O(k dt);
    the decay length is biased by ~k dt/4). A half-voxel misplaced Dirichlet ghost would give ~6 %
    here."""
    dx, dt = (2.0, 0.02) if solver == "explicit" else (4.0, 0.05)
    nx = round(400 / dx)
    k = 0.1
    grid = Grid((1, 1, nx), dx=dx)
    spec = FieldSpec("c", D, decay_per_min=k, solver=solver, bc={"x-": 1.0})
    fs = FieldSet(be, grid, [spec], dtype="float64", dt=dt, track_budget=False)
    for _ in range(round(150 / dt)):
        fs.step()
    u = be.asnumpy(fs["c"])[0, 0]
    x = (np.arange(nx) + 0.5) * dx
    L = np.sqrt(D / k)
    ref = np.exp(-x / L)
    mask = ref > 1e-3
    L_fit = -1.0 / np.polyfit(x[mask], np.log(u[mask]), 1)[0]
    assert abs(L_fit / L - 1) < 5e-3, f"decay length {L_fit:.4f} um vs {L:.4f} um"
    err = np.max(np.abs(u - ref))
    assert err < 1.5 * k * dt + 1e-3, f"max abs error {err:.3e}"


def test_two_layer_steady_flux(be):
    """Layered medium: D = 100 for x < 40 um, 10 beyond, Dirichlet 1 at x- and 0 at x+ (dx = 1,
    100 voxels, interface on a face). The analytic steady state is piecewise linear with one flux
    q = 1 / (40/100 + 60/10); the harmonic face mean makes the discrete solution exact, an
    arithmetic mean would miss q by ~8 %. LOD with dt = 1e5 min reaches it in a few steps."""
    nx, dx = 100, 1.0
    mult = np.ones((1, 1, nx))
    mult[..., 40:] = 0.1
    grid = Grid((1, 1, nx), dx=dx)
    spec = FieldSpec("c", D, solver="lod", bc={"x-": 1.0, "x+": 0.0})
    fs = FieldSet(be, grid, [spec], D_multiplier={"c": mult}, dtype="float64", dt=1e5)
    for _ in range(20):
        fs.step()
    u = be.asnumpy(fs["c"])[0, 0]
    x = (np.arange(nx) + 0.5) * dx
    q = 1.0 / (40 / 100 + 60 / 10)
    ref = np.where(x < 40, 1 - q * x / 100, q * (100 - x) / 10)
    assert np.max(np.abs(u - ref)) < 1e-9
    d = D * mult[0, 0]
    dface = 2 * d[:-1] * d[1:] / (d[:-1] + d[1:])
    flux = dface * (u[:-1] - u[1:]) / dx
    flux_in = 2 * d[0] * (1.0 - u[0]) / dx
    flux_out = 2 * d[-1] * (u[-1] - 0.0) / dx
    np.testing.assert_allclose(flux, q, rtol=1e-9)
    np.testing.assert_allclose([flux_in, flux_out], q, rtol=1e-9)
    b = fs.budget()["c"]
    assert abs(b["imbalance"]) < 1e-9 * max(abs(b["dirichlet_in"]), 1.0)


#: x86-64 builds of LAPACK's reference dptts2 (NumPy/SciPy wheels) use no fused multiply-add, so
#: the plane-wise solve is the same floats there; gfortran fuses by default on aarch64
BITWISE_LAPACK = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plane_wise_lod_solve_is_the_lapack_solve_bit_for_bit(dtype, monkeypatch):
    """Large y and z sweeps solve plane by plane (ops._plane_solve) instead of one LAPACK ?pttrs
    call on a transposed copy; both are dptts2's recurrences in the same order, so the fields
    must be the same floats: variable D with zeros, Dirichlet and zero-flux faces, slots that
    are not contiguous, a non-square grid."""
    from tissuesim.fields import ops

    rs = np.random.default_rng(4)
    shape = (4, 7, 9, 11)
    u0 = rs.random(shape).astype(dtype)
    D = (100.0 * rs.random(shape)).astype(dtype)
    D[1, 3] = 0.0  # a plane of D = 0: uncoupled voxels on every line crossing it
    kinds = np.full((4, 6), ops.BC_ZERO_FLUX, dtype=np.int32)
    kinds[0, [0, 2, 5]] = ops.BC_DIRICHLET
    kinds[3, [1, 3, 4]] = ops.BC_DIRICHLET
    vals = rs.random((4, 6)).astype(dtype)
    for slots in ([0, 1, 2, 3], [0, 3], [1]):
        for axis in ("y", "z"):
            got, ref = u0.copy(), u0.copy()
            monkeypatch.setattr(ops, "PLANE_SOLVE_MIN", 0)
            ops.lod_sweep_numpy(got, D, slots, kinds, vals, axis, 0.37)
            monkeypatch.setattr(ops, "PLANE_SOLVE_MIN", 1 << 60)
            ops.lod_sweep_numpy(ref, D, slots, kinds, vals, axis, 0.37)
            assert not np.array_equal(got, u0), "the sweep changed nothing"
            if BITWISE_LAPACK:
                assert np.array_equal(got.view(np.uint8), ref.view(np.uint8)), (slots, axis)
            else:  # a LAPACK built with fused multiply-adds rounds some products once less
                np.testing.assert_allclose(got, ref, rtol=8 * np.finfo(dtype).eps, atol=0)


def _steady_point_source(n: int, dx: float, D: float, k: float, S: float) -> np.ndarray:
    """Exact steady state of the semi-discrete problem: 5-point Laplacian with zero-flux faces,
    decay k, a source S (units/min) in the centre voxel of an n x n patch (sparse direct solve)."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    e = np.ones(n)
    lap = sp.diags([e[:-1], -2 * e, e[:-1]], [-1, 0, 1]).tolil()
    lap[0, 0] = lap[-1, -1] = -1  # zero flux: the outside neighbour mirrors the voxel
    eye = sp.identity(n)
    A = (sp.kron(eye, lap) + sp.kron(lap, eye)) / dx**2
    src = np.zeros((n, n))
    src[n // 2, n // 2] = S
    return spl.spsolve((k * sp.identity(n * n) - D * A).tocsc(), src.ravel()).reshape(n, n)


@pytest.mark.parametrize("solver", ["lod", "explicit"])
def test_secreting_voxel_reads_near_the_steady_state(be, solver):
    """What cells read after a step near a secreting cell: a steady point source with decay (as
    CXCL10 around one secreting cell: D = 1200 um^2/min, half-life 30 min, dx = 10 um), against
    the exact steady state of the same discrete operator. The fields diffuse after the reaction
    and source, so a step's secretion is spread before it is read. With the other order the
    source voxel holds all of the last step's secretion undiffused: x16 at dt = 1 min, x4.6 at
    0.25 (LOD; measured before the change). Now (numpy, float64): LOD x0.76 / x0.86 at dt = 1 /
    0.25, explicit x0.76 at 0.05; 50 and 100 um away within 3.5 %; the total is exact."""
    n, dx, D, k, S = 33, 10.0, 1200.0, 0.0231, 1.0
    ref = _steady_point_source(n, dx, D, k, S)
    c = n // 2
    ratios = {}
    # explicit: dt = 0.05 min is 3 substeps at 0.8 of the limit (at the limit itself the
    # checkerboard mode is not damped, and the spike of each step rings around the source)
    for dt in (1.0, 0.25) if solver == "lod" else (0.05,):
        fs = FieldSet(
            be, Grid((1, n, n), dx=dx), [FieldSpec("c", D, k, solver=solver)], dtype="float64", dt=dt
        )
        src = np.zeros((1, 1, n, n))
        src[0, 0, c, c] = S
        src = be.asarray(src)
        fs.values[0, 0] = be.asarray(ref)  # start at the answer: only the scheme's own bias remains
        for _ in range(round(400 / dt)):  # 9 decay times: what is left of the start is < 1e-4
            fs.step(source=src)
        u = be.asnumpy(fs["c"])[0]
        ratios[dt] = u[c, c] / ref[c, c]
        assert 0.6 < ratios[dt] <= 1.0, f"dt {dt}: secreting voxel x{ratios[dt]:.3f} the steady state"
        for off in (5, 10):
            np.testing.assert_allclose(
                u[c, c + off], ref[c, c + off], rtol=0.05, err_msg=f"dt {dt}, {off} voxels"
            )
        np.testing.assert_allclose(u.sum(), ref.sum(), rtol=1e-6)
    if len(ratios) == 2:
        assert abs(1 - ratios[0.25]) < abs(1 - ratios[1.0])  # closer as dt shrinks
