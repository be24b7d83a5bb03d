"""The hot operations of the field solvers: each CUDA kernel of kernels/diffusion.cu beside its NumPy twin.

Every pair has the same signature and meaning; the twin (``*_numpy``) is the CPU backend and the
test oracle of the kernel (``*_cupy``). The dispatchers without suffix pick by backend.

Conventions shared by all of them
---------------------------------
u, D : (nf, nz, ny, nx) float32 or float64 arrays, fields stacked on the first axis; D in um^2/min.
slots : int32 (n_slots,) indices of the fields to work on (the others are left untouched).
bc_kind : int32 (nf, 6), per field and face (x-, x+, y-, y+, z-, z+): BC_ZERO_FLUX, BC_DIRICHLET,
    BC_PERIODIC. bc_val : (nf, 6) of u's dtype, the Dirichlet value on the face (units of u).
h_dx2 : h / dx^2 in min/um^2, the step over the squared voxel edge.

Face coefficients are the harmonic mean of the two voxel D's (zero next to a D == 0 voxel); a
Dirichlet value g sits on the face (ghost = 2 g - u, face flux 2 D (g - u)/dx).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

BC_ZERO_FLUX = 0
BC_DIRICHLET = 1
BC_PERIODIC = 2

KERNEL_FILE = "diffusion.cu"
_BLOCK = 256

# Axis of a (nz, ny, nx) array for x, y, z, and the index of the axis' low face in bc arrays.
_AXES = {"x": (2, 0), "y": (1, 2), "z": (0, 4)}


def _sfx(dtype) -> str:
    dt = np.dtype(dtype)
    if dt == np.float32:
        return "f32"
    if dt == np.float64:
        return "f64"
    raise TypeError(f"field arrays must be float32 or float64, got {dt}")


def _kernel(be, name: str, dtype):
    from tissuesim.backend import get_kernel

    return get_kernel(be, KERNEL_FILE, f"{name}_{_sfx(dtype)}")


def _ptr(a) -> int:
    """Device (or host) address of an array's data."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


def _grid1d(total: int) -> tuple[int]:
    return (max(1, min((total + _BLOCK - 1) // _BLOCK, 2**31 - 1)),)


def _grid_fields(nvox: int, n_slots: int) -> tuple[int, int]:
    """(blocks over voxels, fields): blockIdx.y picks the field, x strides over its voxels."""
    # Enough blocks to fill any current GPU several times; the grid-stride loop does the rest.
    return (max(1, min((nvox + _BLOCK - 1) // _BLOCK, 65536)), n_slots)


def harmonic(a, b, xp=np):
    """Face coefficient 2ab/(a+b), 0 where a+b == 0 (no flux next to a D == 0 voxel)."""
    s = a + b
    return 2 * a * b / xp.where(s > 0, s, 1)


# ---------------------------------------------------------------------------------------------
# explicit (forward Euler) substep
# ---------------------------------------------------------------------------------------------


def explicit_faces_numpy(D, s: int, bc_kind) -> dict:
    """Face coefficients of field slot s for explicit_substep_numpy: {axis: (interior, wrap)}.

    interior : 2 D_m D_m+1 / (D_m + D_m+1) between neighbours along the axis (harmonic(), shape
    of the field less one along the axis); wrap : the periodic face between the last and first
    planes (None unless that axis is periodic). D does not change during a run, so FieldSet
    computes these once; they are the very floats harmonic() gives inside a substep.
    """
    out = {}
    for ax in ("x", "y", "z"):
        axis, f = _AXES[ax]
        d = np.moveaxis(D[s], axis, 0)
        if d.shape[0] == 1:
            continue
        wrap = harmonic(d[-1], d[0]) if int(bc_kind[s, f]) == BC_PERIODIC else None
        out[axis] = (harmonic(d[:-1], d[1:]), wrap)
    return out


def explicit_substep_numpy(u_in, u_out, D, slots, bc_kind, bc_val, h_dx2, faces=None) -> None:
    """u_out[s] = u_in[s] + h/dx^2 div(D grad u_in[s]) for s in slots (forward Euler, 5/7-point).

    Writes u_out in place; u_out must not alias u_in. Axes of length 1 are skipped unless they
    carry a Dirichlet face. faces : {slot: explicit_faces_numpy(D, slot, bc_kind)} kept by the
    caller (computed here when absent). Works through three kept field-sized arrays (_scratch):
    per axis the flux g = face (u_m+1 - u_m) adds to cell m and leaves cell m+1, the axis sums
    add up x, y, z; with D of u's dtype (as FieldSet keeps it) these are the floats of the plain
    per-axis expressions.
    """
    shape = u_in.shape[1:]
    nv = int(np.prod(shape))
    work = _scratch(u_in.dtype, 3 * nv)
    acc, ax_acc, gbuf = (work[i * nv : (i + 1) * nv].reshape(shape) for i in range(3))
    hdt = u_in.dtype.type(h_dx2)
    for s in np.asarray(slots).tolist():
        fs = faces[s] if faces is not None and s in faces else explicit_faces_numpy(D, s, bc_kind)
        acc.fill(0)
        for ax in ("x", "y", "z"):
            axis, f = _AXES[ax]
            kl, kh = int(bc_kind[s, f]), int(bc_kind[s, f + 1])
            if u_in.shape[1 + axis] == 1 and BC_DIRICHLET not in (kl, kh):
                continue
            v = np.moveaxis(u_in[s], axis, 0)
            d = np.moveaxis(D[s], axis, 0)
            a = np.moveaxis(ax_acc, axis, 0)
            a.fill(0)
            if axis in fs:
                face, wrap = fs[axis]
                g = np.moveaxis(gbuf, axis, 0)[:-1]
                np.subtract(v[1:], v[:-1], out=g)
                np.multiply(face, g, out=g)  # flux from m+1 into m, times dx
                a[:-1] += g
                a[1:] -= g
                if wrap is not None:
                    gw = wrap * (v[0] - v[-1])  # the wrap face (a plane), flux from 0 into n-1
                    a[-1] += gw
                    a[0] -= gw
            if kl == BC_DIRICHLET:
                a[0] += 2 * d[0] * (bc_val[s, f] - v[0])
            if kh == BC_DIRICHLET:
                a[-1] += 2 * d[-1] * (bc_val[s, f + 1] - v[-1])
            acc += ax_acc
        acc *= hdt
        np.add(u_in[s], acc, out=u_out[s])


def explicit_substep_cupy(u_in, u_out, D, slots, bc_kind, bc_val, h_dx2) -> None:
    """CUDA twin of :func:`explicit_substep_numpy` (kernel diffusion_explicit_f32/_f64)."""
    from tissuesim.fields._device import backend_of

    be = backend_of(u_in)
    ker = _kernel(be, "diffusion_explicit", u_in.dtype)
    _, nz, ny, nx = u_in.shape
    nvox = nz * ny * nx
    if nvox >= 2**31:
        raise ValueError(f"explicit kernel: {nvox} voxels per field; the kernel indexes a field with 32 bits")
    n_slots = int(slots.size)
    if n_slots == 0:
        return
    ker(
        _grid_fields(nvox, n_slots),
        (_BLOCK,),
        (
            u_in,
            u_out,
            D,
            slots,
            np.int32(nz),
            np.int32(ny),
            np.int32(nx),
            bc_kind,
            bc_val,
            u_in.dtype.type(h_dx2),
        ),
    )


# ---------------------------------------------------------------------------------------------
# LOD sweep (backward Euler along one axis, Thomas / cyclic Thomas per grid line)
# ---------------------------------------------------------------------------------------------


def thomas_numpy(a, b, c, d):
    """Solve tridiagonal systems along axis 0, vectorised over the trailing axes.

    a, b, c, d : (n, ...) sub-diagonal (a[0] unused), diagonal, super-diagonal (c[-1] unused) and
    right-hand side. Returns x (n, ...). A loop over n, one vector operation across all lines.
    """
    n = b.shape[0]
    cp = np.empty_like(b)
    dp = np.empty_like(d)
    cp[0] = c[0] / b[0]
    dp[0] = d[0] / b[0]
    for m in range(1, n):
        denom = b[m] - a[m] * cp[m - 1]
        cp[m] = c[m] / denom
        dp[m] = (d[m] - a[m] * dp[m - 1]) / denom
    for m in range(n - 2, -1, -1):
        dp[m] -= cp[m] * dp[m + 1]
    return dp


def lod_line_coefficients(D, h_dx2, kind_lo, val_lo, kind_hi, val_hi, rhs):
    """Tridiagonal system of one backward-Euler sweep along axis 0 of (n, ...) arrays.

    Returns (a, b, c, d, r_wrap): sub/diag/super-diagonals and right-hand side (Dirichlet values
    moved into d), and r_wrap (h/dx^2 Df of the wrap face, periodic) or None.
    """
    dt = rhs.dtype.type
    r = dt(h_dx2) * harmonic(D[:-1], D[1:])
    lo = np.zeros_like(D)
    hi = np.zeros_like(D)
    lo[1:] = r
    hi[:-1] = r
    b = 1 + lo + hi
    d = rhs.copy()
    r_wrap = None
    if kind_lo == BC_DIRICHLET:
        b[0] += 2 * dt(h_dx2) * D[0]
        d[0] += 2 * dt(h_dx2) * D[0] * dt(val_lo)
    if kind_hi == BC_DIRICHLET:
        b[-1] += 2 * dt(h_dx2) * D[-1]
        d[-1] += 2 * dt(h_dx2) * D[-1] * dt(val_hi)
    if kind_lo == BC_PERIODIC and D.shape[0] >= 3:
        r_wrap = dt(h_dx2) * harmonic(D[-1], D[0])
        b[0] += r_wrap
        b[-1] += r_wrap
    return -lo, b, -hi, d, r_wrap


def cyclic_thomas_numpy(a, b, c, d, r_wrap):
    """Periodic tridiagonal solve (corners -r_wrap) by Sherman-Morrison on two Thomas solves."""
    gamma = -b[0]
    bb = b.copy()
    bb[0] = b[0] - gamma
    bb[-1] = b[-1] + r_wrap * r_wrap / b[0]
    y = thomas_numpy(a, bb, c, d)
    w = np.zeros_like(d)
    w[0] = gamma
    w[-1] = -r_wrap
    z = thomas_numpy(a, bb, c, w)
    vfac = r_wrap / b[0]
    fact = (y[0] + vfac * y[-1]) / (1 + z[0] + vfac * z[-1])
    return y - fact * z


def lod_sweep_numpy(u, D, slots, bc_kind, bc_val, axis: str, h_dx2, work=None) -> None:
    """Backward Euler along ``axis`` ('x', 'y' or 'z') for the listed fields, in place.

    (1 - h d/dx D d/dx) u_new = u_old on every grid line: one tridiagonal solve per line (cyclic
    where the axis is periodic). ``work`` is the CUDA twin's scratch space, unused here.

    Speed: D and h do not change from step to step, so the tridiagonal matrices do not either.
    Non-periodic fields are solved as one block-diagonal tridiagonal system (all lines of all
    such fields end to end, uncoupled at line ends) whose LDL^T factors (LAPACK ?pttrf) are cached;
    a step is then one ?pttrs call in compiled code instead of a Python loop over the line
    length. Periodic fields take the cyclic Thomas loop below.
    """
    ax, f = _AXES[axis]
    slots = np.asarray(slots).tolist()
    plain = [s for s in slots if int(bc_kind[s, f]) != BC_PERIODIC or u.shape[1 + ax] < 3]
    if plain:
        _lapack_lod(u, D, plain, bc_kind, bc_val, axis, h_dx2)
    for s in slots:
        if s in plain:
            continue
        v = np.moveaxis(u[s], ax, 0)
        d = np.moveaxis(D[s], ax, 0)
        kl, kh = int(bc_kind[s, f]), int(bc_kind[s, f + 1])
        a, b, c, rhs, r_wrap = lod_line_coefficients(d, h_dx2, kl, bc_val[s, f], kh, bc_val[s, f + 1], v)
        if r_wrap is not None:
            v[...] = cyclic_thomas_numpy(a, b, c, rhs, r_wrap)
        else:
            v[...] = thomas_numpy(a, b, c, rhs)


_LAPACK_CACHE: dict = {}
_LAPACK_CACHE_MAX = 32


def _lapack_factors(u, D, slots, bc_kind, bc_val, axis: str, h_dx2, planes: bool = False):
    """Cached LU factors and Dirichlet right-hand-side term of one sweep (see lod_sweep_numpy);
    with ``planes`` in the layout of the plane-wise solve (_plane_layout).

    Keyed by the identity of the D array object, held through a weak reference so a new array
    that happens to reuse a freed one's id or memory never matches (FieldSet never writes D
    after construction), plus the slots, axis, h/dx^2, dtype and boundary data.
    """
    key = (
        id(D),
        D.shape,
        u.dtype.str,
        tuple(slots),
        axis,
        float(h_dx2),
        bc_kind[slots].tobytes(),
        np.asarray(bc_val)[slots].tobytes(),
        planes,
    )
    hit = _LAPACK_CACHE.get(key)
    if hit is not None and hit[0]() is D:
        return hit[1]
    hit = _factorize(u, D, slots, bc_kind, bc_val, axis, h_dx2)
    if planes:
        hit = _plane_layout(hit)
    if len(_LAPACK_CACHE) >= _LAPACK_CACHE_MAX:
        _LAPACK_CACHE.pop(next(iter(_LAPACK_CACHE)))
    _LAPACK_CACHE[key] = (weakref.ref(D), hit)
    return hit


def _factorize(u, D, slots, bc_kind, bc_val, axis: str, h_dx2):
    """(pttrs, LDL^T factors d and e, Dirichlet term, lines-last shape) of one sweep."""
    from scipy.linalg import lapack

    ax, f = _AXES[axis]
    dt = u.dtype.type
    h = dt(h_dx2)
    d = np.moveaxis(D[slots], ax + 1, -1).astype(u.dtype)  # (n_slots, ..., n): lines last
    r = h * harmonic(d[..., :-1], d[..., 1:])
    diag = np.ones_like(d)
    diag[..., 1:] += r
    diag[..., :-1] += r
    add = np.zeros_like(d)
    for i, s in enumerate(slots):
        if int(bc_kind[s, f]) == BC_DIRICHLET:
            diag[i, ..., 0] += 2 * h * d[i, ..., 0]
            add[i, ..., 0] += 2 * h * d[i, ..., 0] * dt(bc_val[s, f])
        if int(bc_kind[s, f + 1]) == BC_DIRICHLET:
            diag[i, ..., -1] += 2 * h * d[i, ..., -1]
            # += : on a line one voxel long both faces' terms fall on that voxel
            add[i, ..., -1] += 2 * h * d[i, ..., -1] * dt(bc_val[s, f + 1])
    off = np.zeros_like(d)  # off[..., m] couples m and m+1 of a line; 0 at line ends
    off[..., :-1] = -r
    off = off.reshape(-1)[:-1].copy()
    # The matrix is symmetric (one harmonic-mean coefficient per face) and strictly diagonally
    # dominant with a positive diagonal, hence positive definite: LDL^T (?pttrf) needs no
    # pivoting and its solve (?pttrs) is about twice as fast as the general ?gttrs.
    pttrf, pttrs = lapack.get_lapack_funcs(("pttrf", "pttrs"), dtype=u.dtype)
    dd, ee, info = pttrf(diag.reshape(-1), off)
    if info != 0:
        raise FloatingPointError(f"LOD matrix not positive definite (LAPACK pttrf info={info})")
    return (pttrs, dd, ee, add.reshape(-1), d.shape)


def _plane_layout(factors):
    """The factors of _factorize as contiguous (n, n_slots, ...) arrays, the swept axis first
    (d, e with e = 0 closing each line, the Dirichlet term) for the plane-wise solve."""
    _pttrs, dd, ee, add, shape = factors
    e = np.append(ee, ee.dtype.type(0)).reshape(shape)

    def first(a):
        return np.ascontiguousarray(np.moveaxis(a.reshape(shape), -1, 0))

    return first(dd), first(e), first(add)


_SCRATCH = threading.local()


def _scratch(dtype, n: int) -> np.ndarray:
    """A kept 1-D work array of n elements of dtype (grown, never shrunk; one per dtype and
    thread). Its users (the explicit substep, the LOD solves, react_numpy) each take it for the
    length of one call and call no other user meanwhile."""
    key = np.dtype(dtype).str
    d = getattr(_SCRATCH, "d", None)
    if d is None:
        d = _SCRATCH.d = {}
    buf = d.get(key)
    if buf is None or buf.size < n:
        buf = d[key] = np.empty(n, dtype=dtype)
    return buf[:n]


#: plane-wise LOD solve when a plane across the swept axis (all swept fields) has at least this
#: many voxels; below it LAPACK's one call wins (measured crossover 1300-2500, 2 cores)
PLANE_SOLVE_MIN = 2048


def _lapack_lod(u, D, slots, bc_kind, bc_val, axis: str, h_dx2) -> None:
    ax, _ = _AXES[axis]
    contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
    block = u[slots[0] : slots[0] + len(slots)] if contiguous else u[slots]
    n_line = u.shape[1 + ax]
    if ax != 2 and n_line > 1 and block.size // n_line >= PLANE_SOLVE_MIN:
        _plane_solve(block, *_lapack_factors(u, D, slots, bc_kind, bc_val, axis, h_dx2, planes=True), ax)
        if not contiguous:
            u[slots] = block
        return
    pttrs, dd, ee, add, shape = _lapack_factors(u, D, slots, bc_kind, bc_val, axis, h_dx2)
    # right-hand side (lines last) + the Dirichlet term, built in a kept buffer: the same sums as
    # allocating them, without two block-sized allocations per sweep
    rhs = _scratch(u.dtype, add.size)
    np.copyto(rhs.reshape(shape), np.moveaxis(block, ax + 1, -1))
    np.add(rhs, add, out=rhs)
    x, info = pttrs(dd, ee, rhs, overwrite_b=True)
    if info != 0:
        raise FloatingPointError(f"LAPACK pttrs failed (info={info})")
    out = np.moveaxis(x.reshape(shape), -1, ax + 1)
    if contiguous:
        block[...] = out
    else:
        u[slots] = out


def _plane_solve(block, d, e, add, ax: int) -> None:
    """LAPACK's ?pttrs (reference dptts2) applied plane by plane along axis ``ax`` of the
    fields in ``block`` (n_slots, nz, ny, nx), in place: b_i -= b_{i-1} e_{i-1}, then
    b_i = b_i / d_i - b_{i+1} e_i backwards. Every grid line across a plane is advanced in one
    array operation, so the y and z sweeps need no transposed copy into lines-last order. The
    same operations in the same order as the one-call solve: the same floats (checked in
    tests/fields/test_accuracy.py against the LAPACK path).

    d, e, add : from _plane_layout, axis first (n, n_slots, ...)."""
    b = np.moveaxis(block, ax + 1, 0)
    b += add
    t = _scratch(block.dtype, int(np.prod(b.shape[1:]))).reshape(b.shape[1:])
    m = b.shape[0]
    for i in range(1, m):
        np.multiply(b[i - 1], e[i - 1], out=t)
        b[i] -= t
    b[m - 1] /= d[m - 1]
    for i in range(m - 2, -1, -1):
        b[i] /= d[i]
        np.multiply(b[i + 1], e[i], out=t)
        b[i] -= t


class LodWork:
    """Scratch space of the CUDA LOD sweep, kept between steps so a step allocates nothing.

    cp, zs : flat scratch of nf * nvox elements (modified super-diagonal, cyclic second solve).
    ut : flat scratch of nf * nvox for the x <-> y transposed copy of the swept fields.
    Dt : per slot tuple, the transposed D of those fields (D does not change between steps).
    """

    def __init__(self, xp, shape, dtype):
        n = int(np.prod(shape))
        self.cp = xp.empty(n, dtype=dtype)
        self.zs = xp.empty(n, dtype=dtype)
        self.ut = xp.empty(n, dtype=dtype)
        self.Dt: dict = {}


def transpose_xy_numpy(src, dst, in_slots, out_slots) -> None:
    """dst[out_slots[i]] = src[in_slots[i]] with the last two axes swapped.

    src : (nf_in, nz, ny, nx); dst : (nf_out, nz, nx, ny).
    """
    for i, o in zip(np.asarray(in_slots).tolist(), np.asarray(out_slots).tolist()):
        dst[o] = np.swapaxes(src[i], -1, -2)


def transpose_xy_cupy(src, dst, in_slots, out_slots) -> None:
    """CUDA twin of :func:`transpose_xy_numpy` (kernel fields_transpose_xy, shared-memory tiles)."""
    from tissuesim.fields._device import backend_of

    be = backend_of(src)
    ker = _kernel(be, "fields_transpose_xy", src.dtype)
    _, nz, ny, nx = src.shape
    n_slots = int(in_slots.size)
    grid = ((nx + 31) // 32, (ny + 31) // 32, max(1, min(n_slots * nz, 65535)))
    ker(
        grid,
        (32, 8),
        (src, dst, in_slots, out_slots, np.int32(n_slots), np.int32(nz), np.int32(ny), np.int32(nx)),
    )


def _lod_lines_cupy(be, u, D, cp, zs, slots, rows, outer_pf, n, inner, bc_kind, bc_val, face_lo, h_dx2):
    ker = _kernel(be, "diffusion_lod_lines", u.dtype)
    n_slots = int(slots.size)
    ker(
        _grid1d(n_slots * outer_pf * inner),
        (_BLOCK,),
        (
            u,
            D,
            cp,
            zs,
            slots,
            rows,
            np.int32(n_slots),
            np.int32(outer_pf),
            np.int32(n),
            np.int32(inner),
            bc_kind,
            bc_val,
            np.int32(face_lo),
            u.dtype.type(h_dx2),
        ),
    )


def lod_sweep_cupy(u, D, slots, bc_kind, bc_val, axis: str, h_dx2, work: LodWork | None = None) -> None:
    """CUDA twin of :func:`lod_sweep_numpy` (kernel diffusion_lod_lines, one thread per line).

    z and y lines are swept in place: consecutive threads take consecutive x, so every step of
    the Thomas recursion is a coalesced load/store. x lines are contiguous in memory, so one
    thread per x line would read with stride nx (one cache sector per thread per step); instead
    the swept fields are transposed x <-> y into ``work.ut`` with a shared-memory tiled kernel,
    swept there as "y-like" lines (coalesced), and transposed back: two extra coalesced passes are
    far cheaper than n strided ones.
    """
    from tissuesim.fields._device import backend_of

    be = backend_of(u)
    xp = be.xp
    _nf, nz, ny, nx = u.shape
    if work is None:
        work = LodWork(xp, u.shape, u.dtype)
    _ax, face = _AXES[axis]
    if axis == "z":
        _lod_lines_cupy(
            be, u, D, work.cp, work.zs, slots, slots, 1, nz, ny * nx, bc_kind, bc_val, face, h_dx2
        )
        return
    if axis == "y":
        _lod_lines_cupy(be, u, D, work.cp, work.zs, slots, slots, nz, ny, nx, bc_kind, bc_val, face, h_dx2)
        return
    n_slots = int(slots.size)
    compact = xp.arange(n_slots, dtype=xp.int32)
    # keyed by device pointers: reading the slot values would be a host sync
    key = (_ptr(slots), n_slots, _ptr(D))
    Dt = work.Dt.get(key)
    if Dt is None:
        Dt = xp.empty((n_slots, nz, nx, ny), dtype=D.dtype)
        transpose_xy_cupy(D, Dt, slots, compact)
        work.Dt[key] = Dt
    ut = work.ut[: n_slots * nz * nx * ny].reshape(n_slots, nz, nx, ny)
    transpose_xy_cupy(u, ut, slots, compact)
    _lod_lines_cupy(be, ut, Dt, work.cp, work.zs, compact, slots, nz, nx, ny, bc_kind, bc_val, face, h_dx2)
    transpose_xy_cupy(ut, u, compact, slots)


# ---------------------------------------------------------------------------------------------
# reactions (exact exponential integration per voxel)
# ---------------------------------------------------------------------------------------------


def phi1(z):
    """(1 - e^-z)/z, float64, 1 at z = 0."""
    zs = np.where(z == 0, 1.0, z)
    return np.where(np.abs(z) < 1e-8, 1.0 - 0.5 * z, -np.expm1(-zs) / zs)


def phi2(z):
    """(e^-z - 1 + z)/z^2, float64, series near 0 (the direct form cancels)."""
    zs = np.where(np.abs(z) < 1e-2, 1.0, z)
    series = 0.5 + z * (-1.0 / 6 + z * (1.0 / 24 + z * (-1.0 / 120 + z / 720)))
    return np.where(np.abs(z) < 1e-2, series, (np.expm1(-zs) + zs) / (zs * zs))


#: voxels per block of react_numpy: two float64 work blocks of 256 KiB each stay in cache
REACT_BLOCK = 1 << 15


def react_numpy(u, slots, k, lam, src, vr, cb, h, U=None) -> None:
    """Integrate du/dt = b - a u exactly over h for the listed fields, in place.

    a = k + lam + vr (1/min), b = src + vr * cb (units/min):  u <- u e^{-ah} + b h phi1(ah).
    k : float64 (nf,) decay rates. lam, src : like u or None. vr : None, (nz, ny, nx) shared, or
    like u. cb : float64 (nf,) blood concentrations or None (taken as 0). h : step in min.
    U : like u or None; receives int_0^h u dt = u h phi1(ah) + b h^2 phi2(ah) for the budget.

    Computed in float64 whatever u's dtype, term by term as the kernel does (b = src + r cb,
    u e^{-z} + (b h) phi1), one block of REACT_BLOCK voxels at a time through two kept float64
    work blocks. Without the budget (U None) nothing of grid size is allocated: the exponentials of
    the fixed rate are cached across steps (see _react_coefficients_cached), and uptake recomputes
    them only in the voxels where it is nonzero (_with_uptake); the budget allocates its terms.
    """
    for name, a in (("u", u), ("U", U)):
        if a is not None and not a.flags.c_contiguous:  # written through flat views below
            raise ValueError(f"react_numpy: {name} must be C-contiguous (got strides {a.strides})")
    nvox = int(np.prod(u.shape[1:]))
    blk = min(nvox, REACT_BLOCK)
    # two work blocks, and with uptake three blocks of coefficients, from one kept buffer
    work = _scratch(np.float64, (2 if lam is None else 5) * blk)
    wu, wb = work[: 2 * blk].reshape(2, blk)
    cblk = None if lam is None else work[2 * blk :].reshape(3, blk)
    uf = u.reshape(u.shape[0], nvox)
    srcf = None if src is None else src.reshape(src.shape[0], nvox)
    vrf = None if vr is None else vr.reshape(-1, nvox)
    Uf = None if U is None else U.reshape(U.shape[0], nvox)
    for s in np.asarray(slots).tolist():
        r = None if vrf is None else vrf[0 if vr.ndim == 3 else s]
        cbs = float(cb[s]) if (cb is not None and r is not None) else None
        # a field without uptake keeps its cached exponentials (the same floats: k + 0 + r = k + r)
        coefs = _react_coefficients_cached(s, float(k[s]), vr, r, h, U is not None)
        fix = None
        if lam is not None:
            lam_s = lam[s].reshape(nvox)
            taking = lam_s > 0  # (a bool array's nonzero is several times a float array's)
            if taking.any():
                coefs, fix = _with_uptake(coefs, float(k[s]), lam_s, np.flatnonzero(taking), r, h)
        has_b = srcf is not None or cbs is not None
        for v0 in range(0, nvox, blk):
            v1 = min(v0 + blk, nvox)
            m = v1 - v0
            u0, b = wu[:m], wb[:m]
            sl = slice(v0, v1)
            e, p1, p2 = (_part(c, sl) for c in coefs)
            if fix is not None:  # this block's voxels with uptake get their own coefficients
                e, p1, p2 = _fixed_block(fix, (e, p1, p2), v0, v1, cblk[:, :m])

            u0[...] = uf[s, sl]
            if has_b:
                if cbs is not None:
                    np.multiply(r[sl], cbs, out=b, dtype=np.float64)
                    if srcf is not None:
                        b += srcf[s, sl]
                else:
                    b[...] = srcf[s, sl]
                b *= h
            if Uf is not None:  # the budget path (tests, budget tracking) may allocate
                Ui = u0 * h * p1
                if has_b:
                    Ui += b * h * p2
                Uf[s, sl] = Ui
            u0 *= e
            if has_b:
                b *= p1
                u0 += b
            uf[s, sl] = u0


def _with_uptake(cached, k, lam, nz, r, h):
    """The coefficients of a = k + lam + r (lam float (nvox,) >= 0, nonzero at the sorted indices
    nz; r vessel rates or None), given those of a = k + r (``cached``).

    Uptake comes from cells, so it is nonzero in a few percent of the voxels: there the
    coefficients are computed anew and returned as fix = (nz, e, p1, p2 or None) for
    _fixed_block, beside the cached ones for the rest (no grid-sized memory). Where more than a
    quarter of the voxels take up, all are computed anew (fix None). Returns (coefficients, fix).
    """
    dense = 4 * nz.size > lam.shape[0]
    at = slice(None) if dense else nz
    a = k + lam[at].astype(np.float64)
    if r is not None:
        a += r[at]
    fresh = _react_coefficients(a, h, cached[2] is not None)
    return (fresh, None) if dense else (cached, (nz, *fresh))


def _fixed_block(fix, coefs, v0: int, v1: int, out):
    """The block [v0, v1) of the coefficients with the voxels of ``fix`` (see _with_uptake) set
    to theirs, written into out (float64 (3, v1 - v0)) where the block has any."""
    nz = fix[0]
    i0, i1 = np.searchsorted(nz, (v0, v1))
    if i0 == i1:
        return coefs
    at = nz[i0:i1] - v0
    res = []
    for c, cn, o in zip(coefs, fix[1:], out):
        if cn is None:
            res.append(None)
            continue
        o[...] = c  # a block of an array, or a scalar where the rate is the same everywhere
        o[at] = cn[i0:i1]
        res.append(o)
    return tuple(res)


def _part(c, sl):
    """A coefficient's block: c[sl] for an array, c itself for a scalar."""
    return c[sl] if isinstance(c, np.ndarray) and c.ndim else c


_REACT_CACHE: dict = {}


def _react_coefficients_cached(s, k, vr, r, h, want_p2):
    """_react_coefficients for a = k + r without uptake, cached across steps.

    That rate is the same every step, so its exponentials are kept, keyed by slot, k, h and the
    vessel-rate array object (checked through a weak reference, so a new array that reuses a
    freed one's id never matches); the rate itself is only formed on a miss.
    """
    ck = (s, k, id(vr), float(h), want_p2)
    hit = _REACT_CACHE.get(ck)
    if hit is not None and (hit[0] is None if vr is None else hit[0]() is vr):
        return hit[1]
    out = _react_coefficients(k if r is None else k + r.astype(np.float64), h, want_p2)
    if len(_REACT_CACHE) >= 64:
        _REACT_CACHE.pop(next(iter(_REACT_CACHE)))
    _REACT_CACHE[ck] = (None if vr is None else weakref.ref(vr), out)
    return out


def _react_coefficients(a, h, want_p2: bool):
    """(e^{-ah}, phi1(ah), phi2(ah) or None), float64, for the rate a (1/min) over h (min)."""
    z = a * h
    return np.exp(-z), phi1(z), phi2(z) if want_p2 else None


def react_cupy(u, slots, k, lam, src, vr, cb, h, U=None) -> None:
    """CUDA twin of :func:`react_numpy` (kernel fields_react_f32/_f64)."""
    from tissuesim.fields._device import backend_of

    be = backend_of(u)
    ker = _kernel(be, "fields_react", u.dtype)
    nvox = int(np.prod(u.shape[1:]))
    n_slots = int(slots.size)
    if n_slots == 0:
        return
    dummy = u  # never read: its flag is 0
    vr_mode = 0 if vr is None else (1 if vr.ndim == 3 else 2)
    ker(
        _grid_fields(nvox, n_slots),
        (_BLOCK,),
        (
            u,
            slots,
            np.int64(nvox),
            k,
            dummy if lam is None else lam,
            np.int32(lam is not None),
            dummy if src is None else src,
            np.int32(src is not None),
            dummy if vr is None else vr,
            np.int32(vr_mode),
            k if cb is None else cb,
            np.int32(cb is not None),
            np.float64(h),
            dummy if U is None else U,
            np.int32(U is not None),
        ),
    )


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def explicit_substep(be, *args) -> None:
    (explicit_substep_cupy if be.is_gpu else explicit_substep_numpy)(*args)


def lod_sweep(be, *args, **kw) -> None:
    (lod_sweep_cupy if be.is_gpu else lod_sweep_numpy)(*args, **kw)


def react(be, *args, **kw) -> None:
    (react_cupy if be.is_gpu else react_numpy)(*args, **kw)


def transpose_xy(be, *args) -> None:
    (transpose_xy_cupy if be.is_gpu else transpose_xy_numpy)(*args)


def dirichlet_inflow(xp, u, D, slots_by_face, bc_val, h_dx2, out) -> None:
    """Add to ``out`` (float64 (nf,), device) the amount / dx^3 entering through Dirichlet faces.

    Evaluated with the u the flux is computed from (before a forward-Euler substep, after a
    backward-Euler sweep): h/dx^2 * sum_face 2 D (g - u). slots_by_face : {face index (0..5):
    backend int array of the fields with a Dirichlet value there}. Reductions run on the device;
    nothing is read back.
    """
    for face, idx in slots_by_face.items():
        axis = 3 - face // 2  # x -> 3, y -> 2, z -> 1 in (nf, nz, ny, nx)
        end = 0 if face % 2 == 0 else -1
        sl = [slice(None)] * 4
        sl[axis] = end
        ub = u[tuple(sl)][idx]
        Db = D[tuple(sl)][idx]
        g = bc_val[idx, face].reshape(-1, 1, 1)
        flux = xp.sum((2 * Db * (g - ub)).reshape(ub.shape[0], -1), axis=1, dtype=xp.float64)
        out[idx] += h_dx2 * flux
