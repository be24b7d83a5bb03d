"""Diffusion schemes as plain-array functions, and the stability arithmetic of the explicit one.

Equation (one field, lengths in um, times in min):  du/dt = div(D(x) grad u)  on a cell-centred
grid, D in um^2/min, face coefficients by the harmonic mean of the two voxels.

- explicit: forward Euler with the 5-point (2D) / 7-point (3D) conservative stencil; first order
  in time, second in space; stable for h <= dx^2 / (2 ndim Dmax), and with that bound widened for
  Dirichlet faces (stencil_weight) free of negative values and overshoots too. The step is cut
  into the fewest equal substeps that satisfy it. At the bound itself the checkerboard mode is
  not damped (amplification -1): a point source that injects every step then leaves a ringing
  pattern around it, so prefer lod, or a dt a little below a multiple of the limit, there.
  (Standard FTCS; e.g. LeVeque, Finite Difference Methods for Ordinary and Partial Differential
  Equations, SIAM 2007, ch. 9.)
- lod: locally one-dimensional backward Euler, (1 - h A_z)(1 - h A_y)(1 - h A_x) u_new = u_old,
  one tridiagonal (Thomas) solve per grid line and axis, cyclic (Sherman-Morrison) on periodic
  axes; unconditionally stable, first order in time (splitting error O(h) like backward Euler's),
  second in space. As in BioFVM (Ghaffarizadeh, Friedman & Macklin 2016, Bioinformatics 32:1256),
  generalised to variable D(x) and all boundary kinds.
"""

from __future__ import annotations

import math

from tissuesim.fields import ops
from tissuesim.fields._device import backend_of
from tissuesim.fields.boundary import normalize_bc

#: ``solver='auto'`` takes the explicit scheme when it needs at most this many substeps.
AUTO_MAX_EXPLICIT_SUBSTEPS = 4


def stencil_weight(kinds, shape) -> int:
    """W of the explicit limit h <= dx^2 / (W D_max) for one field: the largest sum, over a voxel's
    faces, of the face weights (1 a face to a neighbour, 2 a Dirichlet face, whose value sits half a
    voxel away), bounded per axis. kinds : int (6,) boundary kinds of faces x-, x+, y-, y+, z-, z+;
    shape : (nz, ny, nx). An axis of length >= 2 adds max(2, 1 + w_lo, 1 + w_hi) (w: 2 Dirichlet,
    1 periodic, 0 zero flux), one of length 1 adds 2 per Dirichlet face (none: it is not swept).
    Without Dirichlet faces and axes one voxel long W = 2 ndim, the classical bound. With
    Dirichlet faces the coefficient of a voxel's own value, 1 - h/dx^2 sum(face coefficients),
    stays >= 0, so a step never makes a value negative or overshoot (the bare 2 ndim bound let a
    Dirichlet voxel's coefficient reach 1 - (2 ndim + 1) / (2 ndim) < 0).
    """
    weight = {ops.BC_DIRICHLET: 2, ops.BC_PERIODIC: 1}
    w = 0
    for a, n in enumerate(reversed(tuple(shape))):  # x, y, z
        lo, hi = int(kinds[2 * a]), int(kinds[2 * a + 1])
        if n >= 2:
            w += max(2, 1 + weight.get(lo, 0), 1 + weight.get(hi, 0))
        else:
            w += 2 * ((lo == ops.BC_DIRICHLET) + (hi == ops.BC_DIRICHLET))
    return w


def explicit_stable_dt(
    D_max: float, dx: float, ndim: int, k: float = 0.0, weight: int | None = None
) -> float:
    """Largest stable forward-Euler step in min: 1 / (W D_max / dx^2 + k), W = 2 ndim or ``weight``.

    D_max : largest D in um^2/min; dx : voxel edge in um; ndim : 2 or 3; k : any first-order loss
    rate (1/min) integrated by the same forward Euler step. FieldSet integrates reactions exactly
    (split from diffusion), so it calls this with k = 0, and with the field's stencil_weight()
    (which differs from 2 ndim only with Dirichlet faces or axes one voxel long). Returns inf
    when nothing limits the step. The bound follows from Gershgorin's theorem on the stencil
    matrix (each axis contributes at most 4 D/dx^2 to the spectral radius, Dirichlet ghosts
    included); the weight also keeps every voxel's own coefficient >= 0 (no negative values).
    """
    w = 2.0 * ndim if weight is None else float(weight)
    rate = w * float(D_max) / float(dx) ** 2 + float(k)
    return math.inf if rate <= 0 else 1.0 / rate


def substeps_needed(
    dt: float, D_max: float, dx: float, ndim: int, k: float = 0.0, weight: int | None = None
) -> int:
    """Equal forward-Euler substeps needed to advance dt (min) stably; 0 when D_max == 0 and k == 0
    (weight: see explicit_stable_dt)."""
    lim = explicit_stable_dt(D_max, dx, ndim, k, weight)
    if math.isinf(lim):
        return 0
    return max(1, math.ceil(float(dt) / lim * (1 - 1e-12)))


def _as_stack(u, D, bc, xp):
    """(1, nz, ny, nx) views/copies of u and D, bc arrays, and a squeeze flag for 2D input."""
    two_d = u.ndim == 2
    u4 = u.reshape((1, 1, *u.shape)) if two_d else u.reshape((1, *u.shape))
    if u4.ndim != 4:
        raise ValueError(f"u must be (nz, ny, nx) or (ny, nx), got shape {u.shape}")
    D4 = xp.broadcast_to(xp.asarray(D, dtype=u.dtype), u4.shape[1:]).reshape(u4.shape)
    D4 = xp.ascontiguousarray(D4)
    kinds, vals = normalize_bc(bc, u4.shape[1:], who="diffuse")
    return u4, D4, xp.asarray(kinds.reshape(1, 6)), xp.asarray(vals.reshape(1, 6).astype(u.dtype))


def diffuse_explicit(u, D, dx: float, dt: float, bc=None, xp=None, max_substeps: int | None = None):
    """Advance pure diffusion by dt with forward Euler in automatic stable substeps; returns new u.

    u : (nz, ny, nx) or (ny, nx) float32/float64 array (numpy, or cupy on the GPU), any units.
    D : um^2/min, scalar or array of u's shape. dx : um. dt : min. bc : boundary mapping (see
    tissuesim.fields.boundary), default zero-flux. xp : array module, inferred from u if None.
    Raises ValueError when more than ``max_substeps`` substeps would be needed. Reads max(D) to
    the host (a sync on the GPU): use FieldSet in a time loop.
    """
    be = backend_of(u)
    xp = be.xp if xp is None else xp
    u = xp.ascontiguousarray(u)
    u4, D4, kinds, vals = _as_stack(u, D, bc, xp)
    ndim = 2 if u4.shape[1] == 1 else 3
    w = stencil_weight(be.asnumpy(kinds).reshape(6), u4.shape[1:])
    n = substeps_needed(dt, float(D4.max()), dx, ndim, weight=w)
    if max_substeps is not None and n > max_substeps:
        lim = explicit_stable_dt(float(D4.max()), dx, ndim, weight=w)
        raise ValueError(
            f"diffuse_explicit: dt={dt:g} min needs {n} substeps (stable limit {lim:.4g} min) > max_substeps={max_substeps}"
        )
    slots = xp.zeros(1, dtype=xp.int32)
    a = u4.copy()
    if n == 0:
        return a.reshape(u.shape)
    b = xp.empty_like(a)
    h_dx2 = dt / n / dx**2
    for _ in range(n):
        ops.explicit_substep(be, a, b, D4, slots, kinds, vals, h_dx2)
        a, b = b, a
    return a.reshape(u.shape)


def diffuse_lod(u, D, dx: float, dt: float, bc=None, xp=None):
    """Advance pure diffusion by dt with one LOD backward-Euler step (x, then y, then z); returns new u.

    Arguments as :func:`diffuse_explicit`; unconditionally stable, first order in dt.
    """
    be = backend_of(u)
    xp = be.xp if xp is None else xp
    u4, D4, kinds, vals = _as_stack(xp.ascontiguousarray(u), D, bc, xp)
    a = u4.copy()
    slots = xp.zeros(1, dtype=xp.int32)
    work = ops.LodWork(xp, a.shape, a.dtype) if be.is_gpu else None
    h_dx2 = dt / dx**2
    for axis in ("x", "y", "z"):
        if axis == "z" and a.shape[1] == 1:
            continue
        ops.lod_sweep(be, a, D4, slots, kinds, vals, axis, h_dx2, work=work)
    return a.reshape(u.shape)
