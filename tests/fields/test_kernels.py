"""kernels/diffusion.cu: NVRTC builds (no GPU needed) and every kernel against its NumPy twin.

Parity runs in float32 and float64 on 3D and 2D shapes with odd sizes (partial blocks and tiles),
a subset of fields (slots), variable D with zeros, and every boundary kind, on two devices:

- ``gpu``: the real CUDA kernels through CuPy (skipped without a GPU);
- ``emulated``: the same kernel source built for the host with g++ (tests/fields/
  cuda_host_shim.cpp emulates threadIdx/blockIdx/__shared__/__syncthreads) and driven by the
  very same Python launch code, through a stand-in for the CuPy kernel that checks every launch
  argument against the kernel's C signature (pointer dtypes, np.int32/np.int64/np.float32/
  np.float64 scalars). This runs wherever g++ is, so the CUDA code is verified without a GPU.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from tissuesim import backend as bk
from tissuesim.backend import Backend
from tissuesim.fields import FieldSet, FieldSpec, ops
from tissuesim.grid import Grid

KERNELS = [
    f"{base}_{sfx}"
    for base in ("diffusion_explicit", "diffusion_lod_lines", "fields_react", "fields_transpose_xy")
    for sfx in ("f32", "f64")
]


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        return nvrtc.getVersion()
    except Exception as exc:  # cupy or the NVRTC wheel missing
        pytest.skip(f"NVRTC not available: {exc}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_diffusion_kernels_compile(arch):
    _nvrtc()
    cubin = bk.compile_cubin(ops.KERNEL_FILE, arch)
    for name in KERNELS:  # extern "C": the symbols keep their names
        assert name.encode() in cubin, name


# --------------------------------------------------------------------------- host emulation


@pytest.fixture(scope="module")
def emu_lib(build_host_kernels):
    return build_host_kernels("emu", Path(__file__).with_name("cuda_host_shim.cpp"))


@pytest.fixture(params=["gpu", "emulated"])
def dev(request, monkeypatch, fields_emulation):
    """A backend whose *_cupy paths run the CUDA source: on the GPU, or emulated on the host."""
    if request.param == "gpu":
        return request.getfixturevalue("gpu_be")
    lib = request.getfixturevalue("emu_lib")
    sigs = fields_emulation.signatures()
    xp = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    xp.asnumpy = np.asarray
    fake = Backend("cupy", xp, 0)

    def kernel(be, name, dtype):
        return fields_emulation.Kernel(lib, name, ops._sfx(dtype), sigs[name])

    monkeypatch.setattr(ops, "_kernel", kernel)
    monkeypatch.setattr("tissuesim.fields._device.backend_of", lambda a: fake)
    return fake


def test_signatures_parsed(fields_emulation):
    sigs = fields_emulation.signatures()
    assert set(sigs) == {"diffusion_explicit", "diffusion_lod_lines", "fields_react", "fields_transpose_xy"}
    assert sigs["fields_react"][2] == "i64" and sigs["diffusion_explicit"][-1] == "T"


# --------------------------------------------------------------------------- parity
# cp.array (a copy) everywhere: on the emulated device np.asarray would alias the host input.

# (nf, nz, ny, nx): 3D and 2D, sizes not multiples of 32, and 3D one voxel deep along y
SHAPES = [(2, 5, 37, 33), (3, 1, 35, 34), (3, 4, 1, 9)]


def _setup(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    nf, nz, ny, _nx = shape
    u = rng.random(shape).astype(dtype)
    D = (100.0 * rng.uniform(0.2, 1.8, shape)).astype(dtype)
    D[rng.random(shape) < 0.05] = 0
    kinds = np.zeros((nf, 6), dtype=np.int32)
    vals = np.zeros((nf, 6), dtype=dtype)
    kinds[0, 0:2] = ops.BC_DIRICHLET
    vals[0, 0:2] = (1.0, 0.25)
    kinds[0, 2:4] = ops.BC_PERIODIC
    if nf > 1:
        kinds[1, 0:2] = ops.BC_PERIODIC
        kinds[1, 3] = ops.BC_DIRICHLET
        vals[1, 3] = 0.5
    if nz > 1:
        kinds[0, 4:6] = ops.BC_PERIODIC
        kinds[-1, 4] = ops.BC_DIRICHLET
        vals[-1, 4] = 2.0
    if ny == 1:  # both Dirichlet values act on the one voxel of every y line
        kinds[-1, 2:4] = ops.BC_DIRICHLET
        vals[-1, 2:4] = (1.0, 3.0)
    slots = np.arange(nf, dtype=np.int32)[::-1][: max(1, nf - 1)].copy()  # a subset, out of order
    return u, D, kinds, vals, slots


def _close(a, b, dtype, scale=1.0):
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_explicit_kernel_matches_twin(dev, shape, dtype):
    cp = dev.xp
    u, D, kinds, vals, slots = _setup(shape, dtype)
    h_dx2 = 0.2 / 100.0
    ref = u.copy()
    ops.explicit_substep_numpy(u, ref, D, slots, kinds, vals, h_dx2)
    out = cp.array(u)  # untouched slots must keep u
    ops.explicit_substep_cupy(
        cp.array(u), out, cp.array(D), cp.array(slots), cp.array(kinds), cp.array(vals), h_dx2
    )
    _close(cp.asnumpy(out), ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_lod_kernel_matches_twin(dev, shape, dtype, axis):
    cp = dev.xp
    u, D, kinds, vals, slots = _setup(shape, dtype, seed=1)
    h_dx2 = 5.0 / 100.0  # 5 min on 10 um voxels: stiff, far beyond the explicit limit
    ref = u.copy()
    ops.lod_sweep_numpy(ref, D, slots, kinds, vals, axis, h_dx2)
    g = cp.array(u)
    work = ops.LodWork(cp, g.shape, g.dtype)
    ops.lod_sweep_cupy(
        g, cp.array(D), cp.array(slots), cp.array(kinds), cp.array(vals), axis, h_dx2, work=work
    )
    _close(cp.asnumpy(g), ref, dtype, scale=float(np.abs(ref).max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vr_mode", [0, 1, 2])
def test_react_kernel_matches_twin(dev, dtype, vr_mode):
    cp = dev.xp
    rng = np.random.default_rng(2)
    shape = (3, 4, 9, 11)
    u = rng.random(shape).astype(dtype)
    k = np.array([0.0, 0.05, 2.0])
    lam = (0.5 * rng.random(shape)).astype(dtype)
    lam[0, 0] = 0  # a == 0 somewhere: the phi1/phi2 limits
    src = rng.random(shape).astype(dtype)
    vr = None if vr_mode == 0 else (rng.random(shape[1:] if vr_mode == 1 else shape).astype(dtype))
    cb = np.array([1.0, 0.0, 3.0])
    slots = np.array([2, 0], dtype=np.int32)
    for h in (1e-4, 0.3, 20.0):
        ref, Uref = u.copy(), np.zeros_like(u)
        ops.react_numpy(ref, slots, k, lam, src, vr, cb, h, Uref)
        g, Ug = cp.array(u), cp.zeros_like(cp.array(u))
        ops.react_cupy(
            g,
            cp.array(slots),
            cp.array(k),
            cp.array(lam),
            cp.array(src),
            None if vr is None else cp.array(vr),
            cp.array(cb),
            h,
            Ug,
        )
        _close(cp.asnumpy(g), ref, dtype, scale=float(np.abs(ref).max()))
        _close(cp.asnumpy(Ug), Uref, dtype, scale=float(np.abs(Uref).max()))
    # optional inputs absent
    ref = u.copy()
    ops.react_numpy(ref, slots, k, None, None, None, None, 0.5, None)
    g = cp.array(u)
    ops.react_cupy(g, cp.array(slots), cp.array(k), None, None, None, None, 0.5, None)
    _close(cp.asnumpy(g), ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vr_mode", [1, 2])
def test_react_twin_follows_kernel_arithmetic(dev, dtype, vr_mode, monkeypatch):
    """The run's case (no uptake: cached exponentials; a source, vessels, blood) in blocks smaller
    than the field: NumPy does the kernel's float64 arithmetic term by term, so the two agree to
    the last bit of the field's dtype up to the libm's exp (one unit in the last place in float32,
    a few in float64 where exp's own last-bit differences show).
    The twin before this test formed r cb and the rate in float32 and was 2 units off here."""
    cp = dev.xp
    monkeypatch.setattr(ops, "REACT_BLOCK", 37)  # several blocks and a partial one per field
    rng = np.random.default_rng(5)
    shape = (3, 5, 9, 11)
    vr = (0.3 * rng.random(shape[1:] if vr_mode == 1 else shape)).astype(dtype)
    for h in (0.25, 3.0):
        u = rng.random(shape).astype(dtype)
        src = rng.random(shape).astype(dtype)
        src[1] = 0
        k = np.array([0.0, 0.05, 2.0])
        cb = np.array([1.3, 0.7, 3.1])
        slots = np.array([2, 0, 1], dtype=np.int32)
        for _ in range(2):  # the second call takes the cached exponentials
            ref = u.copy()
            ops.react_numpy(ref, slots, k, None, src, vr, cb, h, None)
            g = cp.array(u)
            ops.react_cupy(
                g, cp.array(slots), cp.array(k), None, cp.array(src), cp.array(vr), cp.array(cb), h
            )
            got = cp.asnumpy(g)
            ulp = np.abs(
                got.view(np.int32 if dtype == np.float32 else np.int64)
                - ref.view(got.view(np.int32 if dtype == np.float32 else np.int64).dtype)
            )
            assert int(ulp.max()) <= (1 if dtype == np.float32 else 4), (
                f"h={h}: {int(ulp.max())} units in the last place apart"
            )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose_kernel_matches_twin(dev, dtype):
    cp = dev.xp
    rng = np.random.default_rng(3)
    src = rng.random((3, 2, 45, 70)).astype(dtype)
    in_slots = np.array([2, 0], dtype=np.int32)
    out_slots = np.array([0, 1], dtype=np.int32)
    ref = np.zeros((2, 2, 70, 45), dtype=dtype)
    ops.transpose_xy_numpy(src, ref, in_slots, out_slots)
    out = cp.zeros((2, 2, 70, 45), dtype=dtype)
    ops.transpose_xy_cupy(cp.array(src), out, cp.array(in_slots), cp.array(out_slots))
    np.testing.assert_array_equal(cp.asnumpy(out), ref)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fieldset_step_matches_numpy(dev, dtype):
    """A whole step (explicit with substeps, LOD, D == 0 field, reactions, budget) on both backends."""
    from tissuesim.backend import NUMPY

    rng = np.random.default_rng(4)
    grid = Grid((7, 18, 21), dx=10.0)
    specs = [
        FieldSpec("a", 100.0, decay_per_min=0.01, solver="explicit", bc={"x-": 1.0}),
        FieldSpec(
            "b", 3000.0, decay_per_min=0.1, solver="lod", bc={"y-": "periodic", "y+": "periodic", "z+": 0.2}
        ),
        FieldSpec("d", 0.0, decay_per_min=0.001),
    ]
    mult = {"a": rng.uniform(0.5, 1.5, grid.shape), "b": rng.uniform(0.5, 1.5, grid.shape)}
    vr = np.where(rng.random(grid.shape) < 0.1, 0.3, 0.0)
    u0 = rng.random((3, *grid.shape))
    src = 0.01 * rng.random((3, *grid.shape))
    upt = 0.01 * rng.random((3, *grid.shape))
    out = {}
    for be in (NUMPY, dev):
        fs = FieldSet(be, grid, specs, D_multiplier=mult, vessel_rate=vr, dtype=dtype, dt=0.5)
        fs.values[...] = be.asarray(u0.astype(dtype))
        for _ in range(5):
            fs.step(
                source=be.asarray(src.astype(dtype)),
                uptake=be.asarray(upt.astype(dtype)),
                c_blood=be.asarray(np.array([1.0, 2.0, 0.0])),
            )
        out[be.name] = (be.asnumpy(fs.values), fs.budget())
    tol = 1e-4 if dtype == "float32" else 1e-11
    np.testing.assert_allclose(out["cupy"][0], out["numpy"][0], rtol=tol, atol=tol)
    for name in ("a", "b", "d"):
        scale = out["numpy"][1][name]["total"]  # differences of totals: compare on the totals' scale
        for term, v in out["numpy"][1][name].items():
            if term != "imbalance":
                assert out["cupy"][1][name][term] == pytest.approx(v, rel=tol, abs=tol * scale), (name, term)


def test_react_twin_refuses_arrays_it_cannot_update_in_place():
    """react_numpy writes through flat views: a non-contiguous field array would be updated in
    a copy and left unchanged, so it is refused."""
    u = np.ones((2, 3, 4, 6), dtype=np.float32)[:, :, :, 1:4]
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.react_numpy(u, np.array([0, 1]), np.array([0.1, 0.2]), None, None, None, None, 1.0)
