"""Cell motility: persistent random walk, chemotaxis, crowding, walls, vessel entry and exit.

Persistent random walk (Ornstein-Uhlenbeck velocity). Per axis, with persistence time P (min)
and speed s (um/min, root-mean-square speed in d = 2 or 3 dimensions)::

    dv = -(v - v_d) / P dt + sqrt(2 sigma^2 / P) dW,   dx = v dt,   sigma^2 = s^2 / d

so <|v|^2> = s^2 and, without drift, the mean squared displacement is Fuerth's formula

    MSD(t) = 2 d D [t - P (1 - exp(-t / P))],   D = sigma^2 P = s^2 P / d

(Fuerth 1920; Dunn & Brown 1987; Wu et al., Nat Protoc 2014). The step integrates the OU
process exactly over dt (velocity and displacement drawn jointly; Gillespie, Phys Rev E 54, 2084
(1996)), so the MSD is exact for any dt/P, not only for dt << P: with a = exp(-dt/P),

    v'  = v_d + a (v - v_d) + sd_v xi1
    dx  = v_d dt + P (1 - a)(v - v_d) + c_xv xi1 + sd_x xi2
    sd_v^2 = sigma^2 (1 - a^2),  Var dx = sigma^2 P^2 (2 dt/P - 3 + 4 a - a^2),
    Cov = sigma^2 P (1 - a)^2,   c_xv = Cov / sd_v,  sd_x^2 = Var dx - Cov^2 / sd_v^2.

Chemotaxis (receptor-occupancy sensing, Lauffenburger & Linderman, "Receptors", 1993; Tranquillo,
Lauffenburger & Zigmond, J Cell Biol 106, 303 (1988)): the drift velocity follows the gradient of
the fraction of bound receptors f = c / (K + c):

    v_d = chi grad f = chi K / (K + c)^2 grad c,   |v_d| <= max_drift_fraction * s

with chi the chemotactic sensitivity (um^2/min) and K the receptor dissociation constant (field
units). Bias is strongest at c ~ K and fades where receptors saturate (c >> K). grad c comes
from central differences at the cell's voxel over open neighbours (one-sided next to closed
voxels and domain faces, zero where both neighbours along an axis are closed).

Crowding: see neighbours.crowd_displacement (pairs overlapping within R_i + R_j pushed apart).

Walls (documented rule): the step is applied axis by axis (x, y, z), each axis component in
equal substeps shorter than 0.99 dx, so a substep crosses at most one voxel face. A substep that
would end in a closed voxel stops that axis' move (the cell stays at the last open position
along it) and reverses that velocity component; the other axes still move, so a cell slides
along a wall and never enters, nor tunnels through, a closed voxel. Domain faces reflect the
position and the velocity component. In 2D (nz == 1) z and v_z stay fixed. Only a component
longer than 64 x 0.99 dx in one step is capped (FLAG_DISPLACEMENT_CAPPED): dt is far too large.

CUDA: kernels/agents.cu move_cells; NumPy twin: move_cells_numpy (same float32 arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tissuesim.agents import _kernels as K
from tissuesim.agents import rng
from tissuesim.agents.neighbours import build_cell_list, crowd_displacement
from tissuesim.agents.population import Population
from tissuesim.backend import device_constant
from tissuesim.grid import Grid

NTP = 9  # per-type parameters in the kernel table (agents.cu)
MAX_SUBSTEPS = 64  # as in agents.cu: an axis move of more than 64 max_disp is capped (flagged)
MAX_DISP_FRACTION = 0.99
#: NumPy moves cells in blocks of this many rows: the work arrays (~330 B per cell) stay near
#: 1.4 MB (0.24x the state at 64^3 + 1e4 cells, 0.47x with blocks of 16384, for 0-2% of step time:
#: bench/move_block.py, bench/results/step_cpu_move_block16384_4096.json)
MOVE_BLOCK = 4096


@dataclass(frozen=True)
class MotilityParams:
    """Motility of one cell type.

    speed_um_per_min : RMS crawling speed s (0: sessile).
    persistence_min : persistence time P of the OU velocity (> 0).
    chemotaxis_field : name of the field followed, or None.
    chemotactic_sensitivity_um2_per_min : chi in v_d = chi K/(K+c)^2 grad c.
    receptor_kd : K, in the field's units.
    max_drift_fraction : cap of |v_d| as a fraction of speed.
    crowding_radius_um : cell radius for crowding (0: the type neither pushes nor is pushed).
    crowding_stiffness_per_min : overlap relaxation rate k (fraction min(1, k dt) per step).
    """

    speed_um_per_min: float = 5.0
    persistence_min: float = 3.0
    chemotaxis_field: str | None = None
    chemotactic_sensitivity_um2_per_min: float = 0.0
    receptor_kd: float = 1.0
    max_drift_fraction: float = 1.0
    crowding_radius_um: float = 0.0
    crowding_stiffness_per_min: float = 1.0

    def __post_init__(self):
        if not self.speed_um_per_min >= 0:
            raise ValueError(f"speed_um_per_min must be >= 0, got {self.speed_um_per_min}")
        if not self.persistence_min > 0:
            raise ValueError(f"persistence_min must be > 0, got {self.persistence_min}")
        if not self.receptor_kd > 0:
            raise ValueError(f"receptor_kd must be > 0, got {self.receptor_kd}")
        if self.crowding_radius_um < 0 or self.crowding_stiffness_per_min < 0:
            raise ValueError("crowding radius and stiffness must be >= 0")


def ou_coefficients(speed: float, persistence: float, dt: float, ndim: int) -> tuple[float, ...]:
    """(a, sd_v, c_xv, sd_x, P(1-a)) of the exact OU step, computed in float64."""
    sig2 = speed * speed / ndim
    h = dt / persistence
    a = math.exp(-h)
    one_m_a = -math.expm1(-h)
    var_v = sig2 * one_m_a * (1.0 + a)
    var_x = sig2 * persistence**2 * (2.0 * h - one_m_a * (3.0 - a))
    cov = sig2 * persistence * one_m_a**2
    sd_v = math.sqrt(var_v)
    c_xv = cov / sd_v if sd_v > 0 else 0.0
    sd_x = math.sqrt(max(var_x - (cov * cov / var_v if var_v > 0 else 0.0), 0.0))
    return a, sd_v, c_xv, sd_x, persistence * one_m_a


def type_table(params: Sequence[MotilityParams], field_names: Sequence[str], dt: float, ndim: int):
    """Per-type kernel tables: tp float32 (ntypes, 9) and tfield int32 (ntypes,)."""
    tp = np.zeros((len(params), NTP), dtype=np.float64)
    tfield = np.full(len(params), -1, dtype=np.int32)
    names = list(field_names)
    for t, p in enumerate(params):
        tp[t, :5] = ou_coefficients(p.speed_um_per_min, p.persistence_min, dt, ndim)
        tp[t, 5] = p.chemotactic_sensitivity_um2_per_min
        tp[t, 6] = p.receptor_kd
        tp[t, 7] = p.max_drift_fraction * p.speed_um_per_min
        if p.chemotaxis_field is not None and p.chemotactic_sensitivity_um2_per_min != 0:
            if p.chemotaxis_field not in names:
                raise KeyError(f"chemotaxis field {p.chemotaxis_field!r} not among fields {names}")
            tfield[t] = names.index(p.chemotaxis_field)
    return tp.astype(np.float32), tfield


_TABLES: dict = {}


def _tables(params: Sequence[MotilityParams], names: Sequence[str], dt: float, ndim: int):
    """(tp, tfield, radius, stiffness) of type_table and the crowding columns, cached by content.

    The cached arrays are read-only (shared between steps and populations).
    """
    key = (tuple(params), tuple(names), float(dt), int(ndim))
    try:
        hit = _TABLES.get(key)
    except TypeError:  # unhashable parameters: no cache
        key, hit = None, None
    if hit is not None:
        return hit
    tp, tfield = type_table(params, names, dt, ndim)
    radius = np.array([p.crowding_radius_um for p in params], dtype=np.float32)
    stiff = np.array([p.crowding_stiffness_per_min for p in params], dtype=np.float32)
    for a in (tp, tfield, radius, stiff):
        a.flags.writeable = False
    hit = (tp, tfield, radius, stiff)
    if key is not None:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        _TABLES[key] = hit
    return hit


def _stack_fields(xp, fields, grid: Grid):
    """(values float32 (nf, nz, ny, nx), names) from a FieldSet-like, a mapping, or None."""
    if fields is None:
        return xp.zeros((1, *grid.shape), dtype=np.float32), []
    if isinstance(fields, Mapping):
        names = list(fields)
        vals = xp.stack([xp.asarray(fields[k], dtype=np.float32) for k in names]) if names else None
        if vals is None:
            return xp.zeros((1, *grid.shape), dtype=np.float32), []
        return xp.ascontiguousarray(vals), names
    return xp.ascontiguousarray(xp.asarray(fields.values, dtype=np.float32)), list(fields.names)


_ONES: dict = {}


def _open_u8(xp, open_mask, grid: Grid):
    if open_mask is None:
        if xp is not np:
            return xp.ones(grid.shape, dtype=np.uint8)
        ones = _ONES.get(grid.shape)
        if ones is None:
            ones = _ONES[grid.shape] = np.ones(grid.shape, dtype=np.uint8)
            ones.flags.writeable = False
        return ones
    m = xp.asarray(open_mask)
    if tuple(m.shape) != tuple(grid.shape):
        raise ValueError(f"open_mask shape {tuple(m.shape)} != grid shape {grid.shape}")
    if m.dtype in (np.bool_, np.uint8) and m.flags.c_contiguous:
        # kernel and twin read it as != 0, and a bool is one byte of 0 or 1: a view, no copy (on
        # CuPy no launch and no grid-sized allocation in every step)
        return m.view(np.uint8)
    return xp.ascontiguousarray(m != 0).view(np.uint8)


def _voxel_axis(q, o, dx, nmax):
    """Voxel index along one axis of float32 coordinates q (as Grid.voxel_index): int64, clipped."""
    if nmax == 0:  # clipped to [0, 0] whatever the position (NaN included)
        return np.zeros(q.shape[0], dtype=np.int64)
    c = q - o
    c /= dx
    np.floor(c, out=c)
    c = c.astype(np.int64)
    np.maximum(c, 0, out=c)  # = np.clip(c, 0, nmax), without its Python-level overhead
    return np.minimum(c, nmax, out=c)


class _Geometry:
    """Per-grid constants of move_cells_numpy (float32 origin, bounds, strides), cached."""

    __slots__ = ("axes", "dx", "hi", "nmax", "nn", "o", "o_col", "stride")

    def __init__(self, grid: Grid):
        f32 = np.float32
        nz, ny, nx = grid.shape
        self.dx = f32(grid.dx)
        self.o = tuple(f32(o) for o in grid.origin)
        self.nn = (nx, ny, nz)
        self.nmax = (nx - 1, ny - 1, nz - 1)
        self.stride = (1, nx, nx * ny)
        self.hi = tuple(f32(self.o[a] + f32(self.nn[a]) * self.dx) for a in range(3))
        # axes with more than one voxel (the others index 0 whatever the position)
        self.axes = tuple(a for a in range(3) if self.nmax[a] > 0)
        self.o_col = np.array([self.o[a] for a in self.axes], dtype=f32).reshape(-1, 1)


_GEOMETRY: dict = {}


def _geometry(grid: Grid) -> _Geometry:
    g = _GEOMETRY.get(grid)
    if g is None:
        if len(_GEOMETRY) >= 64:
            _GEOMETRY.clear()
        g = _GEOMETRY[grid] = _Geometry(grid)
    return g


def _voxel_columns(P, geo: _Geometry):
    """int64 (3, m) voxel index of the float32 coordinates P (3, m), as _voxel_axis per axis."""
    m = P.shape[1]
    idx = np.zeros((3, m), dtype=np.int64)
    ax = geo.axes
    if not ax:
        return idx
    if ax == (0, 1) or ax == (0, 1, 2):
        k = len(ax)
        c = P[:k] - geo.o_col
        c /= geo.dx
        np.floor(c, out=c)
        sub = idx[:k]
        np.copyto(sub, c, casting="unsafe")
        np.maximum(sub, 0, out=sub)
        np.minimum(sub, _NMAX_COL[geo.nmax[:k]], out=sub)
        return idx
    for a in ax:
        idx[a] = _voxel_axis(P[a], geo.o[a], geo.dx, geo.nmax[a])
    return idx


class _NmaxCols(dict):
    def __missing__(self, key):
        v = self[key] = np.array(key, dtype=np.int64).reshape(-1, 1)
        return v


_NMAX_COL = _NmaxCols()


def move_cells_numpy(
    pos,
    vel,
    type_,
    ids,
    crowd,
    fields,
    tfield,
    tp,
    open_,
    grid: Grid,
    n,
    dt,
    step,
    k0,
    k1,
    ndim,
    max_disp,
    flags,
):
    """NumPy twin of kernel move_cells: updates pos, vel (float32 (>= n, 3)) rows [:n] in place.

    Cells of unknown type are left alone (and flagged); the others are processed as compact
    (3, m) float32 coordinate rows with the kernel's operations in the kernel's order (the axes
    side by side where the kernel treats them alike). Substeps past the first one run on the
    few cells that still move.
    """
    f32 = np.float32
    if n == 0:
        return
    geo = _geometry(grid)
    dx = geo.dx
    nn = geo.nn
    stride = geo.stride
    t = type_[:n]
    bad = tp.shape[0] < 256 and int(t.max()) >= tp.shape[0]
    if bad:
        flags[0] |= np.uint32(K.FLAG_BAD_TYPE)
    rows = None  # None: every cell has parameters
    if bad:
        rows = np.flatnonzero(t < tp.shape[0])
        if rows.size == 0:
            return
        t = t[rows]
    m = n if rows is None else rows.size
    pv = pos[:n] if rows is None else pos[rows]
    vv = vel[:n] if rows is None else vel[rows]
    Pm = np.ascontiguousarray(pv.T)  # (3, m) positions, one row per axis
    V = np.ascontiguousarray(vv.T)
    cr = crowd[:n] if rows is None else crowd[rows]
    idn = ids[:n] if rows is None else ids[rows]
    t = t.astype(np.intp)
    C = tp.take(t, axis=0).T  # per-cell parameters (9, m); rows 0..4: OU coefficients

    idx = _voxel_columns(Pm, geo)
    open_flat = open_.reshape(-1)
    here = stride[2] * idx[2]
    here += idx[1] * stride[1]
    here += idx[0]
    if not open_flat[here].all():
        flags[0] |= np.uint32(K.FLAG_IN_CLOSED_VOXEL)

    VD = np.zeros((3, m), dtype=f32)
    fi = tfield[t]
    chem = np.flatnonzero(fi >= 0)
    if chem.size:
        _chemotaxis(VD, chem, fi, t, tp, idx, here, fields, open_flat, geo, ndim)

    # normals: x uses (z0, z1), y (z2, z3), z (z4, z5): Box-Muller of Philox words (0, 1), (2, 3)
    # of draw 0 and (0, 1) of draw 1; computed in one pass (elementwise, so bit-identical)
    key = (k1 << 32) | k0
    if ndim == 3:
        w0, w1, w2, w3 = rng.draw_blocks(idn, step, rng.PURPOSE_MOVE, (0, 1), key)
        za, zb = rng.box_muller(np.concatenate([w0[0], w2[0], w0[1]]), np.concatenate([w1[0], w3[0], w1[1]]))
    else:
        r0 = rng.draw(idn, step, rng.PURPOSE_MOVE, 0, key)
        za, zb = rng.box_muller(np.concatenate([r0[0], r0[2]]), np.concatenate([r0[1], r0[3]]))
    Z1 = za.reshape(ndim, m)
    Z2 = zb.reshape(ndim, m)
    dtf = f32(dt)
    vd = VD[:ndim]
    U = V[:ndim] - vd
    D = vd * dtf
    D += C[4] * U
    D += C[2] * Z1
    D += C[3] * Z2
    D += cr.T[:ndim]
    Vn = C[0] * U
    np.add(vd, Vn, out=Vn)
    Vn += C[1] * Z1
    V[:ndim] = Vn
    if ndim == 2:
        V[2] = 0
    for a in range(ndim):
        _walk_axis(
            a,
            Pm[a],
            V[a],
            D[a],
            idx[a],
            here,
            stride[a],
            geo.o[a],
            geo.hi[a],
            dx,
            nn[a] - 1,
            open_flat,
            max_disp,
            flags,
        )
    if rows is None:
        pos[:n] = Pm.T
        vel[:n] = V.T
    else:
        pos[rows] = Pm.T
        vel[rows] = V.T


def _chemotaxis(VD, chem, fi, t, tp, idx, here, fields, open_flat, geo: _Geometry, ndim):
    """Drift velocity v_d (rows of VD at the columns ``chem``) of the chemotactic cells."""
    f32 = np.float32
    nn, stride, dx = geo.nn, geo.stride, geo.dx
    fflat = fields.reshape(-1)
    nvox = nn[0] * nn[1] * nn[2]
    h = here[chem]
    base = fi[chem].astype(np.int64) * nvox + h  # flat index into the stacked fields
    cc = fflat[base]
    tc = t[chem]
    g = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in range(3):
            if a >= ndim:
                g.append(np.zeros(chem.size, dtype=f32))
                continue
            ia = idx[a][chem]
            up = ia + 1 < nn[a]
            dn = ia >= 1
            ip = (up & (open_flat[np.where(up, h + stride[a], h)] != 0)).astype(np.int64)
            im = (dn & (open_flat[np.where(dn, h - stride[a], h)] != 0)).astype(np.int64)
            s = ip + im
            fp = fflat[base + ip * stride[a]]
            fm = fflat[base - im * stride[a]]
            ga = (fp - fm) / (s.astype(f32) * dx)
            g.append(np.where(s > 0, ga, f32(0)))
        Kd = tp[:, 6][tc]
        den = Kd + cc
        sc = np.where(den > 0, tp[:, 5][tc] * Kd / (den * den), f32(0)).astype(f32)
        g = [ga * sc for ga in g]
        m2 = g[0] * g[0] + g[1] * g[1] + g[2] * g[2]
        cap = tp[:, 7][tc]
        over = np.flatnonzero(m2 > cap * cap)
        if over.size:
            fac = cap[over] / np.sqrt(m2[over])
            for ga in g:
                ga[over] = ga[over] * fac
    for a in range(3):
        VD[a][chem] = g[a]


def _walk_axis(a, pa, va, da, ia, here, stride, lo, hi, dx, nmax, open_flat, max_disp, flags):
    """Move along axis a in equal substeps < dx, stopping at closed voxels (kernel move_cells).

    pa, va, ia (float32 / int64 (m,) rows of axis a) and here (flat voxel) are updated in place.
    The first substep runs on every cell; the later ones only on the cells that still move
    (same outcome, kernel order per cell).
    """
    f32 = np.float32
    nsub = np.abs(da)
    nsub /= max_disp
    np.ceil(nsub, out=nsub)
    nsub = nsub.astype(np.int64)
    np.maximum(nsub, 1, out=nsub)
    nmax_sub = int(nsub.max())
    if nmax_sub > MAX_SUBSTEPS:
        flags[0] |= np.uint32(K.FLAG_DISPLACEMENT_CAPPED)
        over = nsub > MAX_SUBSTEPS
        da = np.where(over, np.where(da > 0, f32(MAX_SUBSTEPS) * max_disp, f32(-MAX_SUBSTEPS) * max_disp), da)
        np.minimum(nsub, MAX_SUBSTEPS, out=nsub)
        nmax_sub = MAX_SUBSTEPS
    # x / 1 == x exactly (signed zeros and NaN included): one substep needs no division
    sub = da if nmax_sub == 1 else da / nsub.astype(f32)
    o = lo
    # first substep: every cell
    q = pa + sub
    refl = q < lo
    refl |= q >= hi
    sq = sub
    any_refl = bool(refl.any())
    if any_refl:
        below = q < lo
        above = ~below & (q >= hi)
        q = np.where(below, lo + (lo - q), np.where(above, hi - (q - hi), q))
        sq = np.where(refl, -sub, sub)
    np.maximum(q, lo, out=q)
    np.minimum(q, hi, out=q)
    ca = _voxel_axis(q, o, dx, nmax)
    flat = ca - ia
    flat *= stride
    flat += here
    ok = open_flat[flat] != 0
    # velocity: reflected where the move reflected and was taken, reversed where it was refused
    neg = ~ok
    if any_refl:
        neg |= refl
    np.negative(va, out=va, where=neg)
    np.copyto(pa, q, where=ok)
    np.copyto(ia, ca, where=ok)
    np.copyto(here, flat, where=ok)
    if nmax_sub == 1:
        return
    sub = np.where(ok, sq, sub)
    act = np.flatnonzero(ok & (nsub > 1))
    for s_ in range(1, nmax_sub):
        if act.size == 0:
            break
        p_s, sub_s, va_s, ia_s, here_s = pa[act], sub[act], va[act], ia[act], here[act]
        q = p_s + sub_s
        below = q < lo
        above = ~below & (q >= hi)
        refl = below | above
        vq, sq = va_s, sub_s
        if refl.any():
            q = np.where(below, lo + (lo - q), np.where(above, hi - (q - hi), q))
            vq = np.where(refl, -va_s, va_s)
            sq = np.where(refl, -sub_s, sub_s)
        q = np.minimum(np.maximum(q, lo), hi)
        ca = _voxel_axis(q, o, dx, nmax)
        flat = ca - ia_s
        flat *= stride
        flat += here_s
        ok = open_flat[flat] != 0
        pa[act] = np.where(ok, q, p_s)
        va[act] = np.where(ok, vq, -va_s)
        sub[act] = np.where(ok, sq, sub_s)
        ia[act] = np.where(ok, ca, ia_s)
        here[act] = np.where(ok, flat, here_s)
        act = act[ok & (nsub[act] > s_ + 1)]


def _as_params(pop: Population, motility):
    if motility is None:
        motility = getattr(pop, "motility", None)
    if motility is None:
        raise ValueError("move needs motility parameters (a sequence of MotilityParams, index = type)")
    if isinstance(motility, MotilityParams):
        motility = [motility]
    return list(motility)


def move(
    pop: Population,
    grid: Grid,
    open_mask,
    dt_min: float,
    step: int,
    seed: int,
    motility: Sequence[MotilityParams] | None = None,
    fields=None,
    cell_list=None,
) -> None:
    """Advance every live cell of ``pop`` by one step of dt_min minutes (in place, no sync).

    open_mask : (nz, ny, nx) bool/uint8, nonzero where cells may be, or None (all open).
    step, seed : the random stream key (counter-based; same inputs, same outcome).
    motility : MotilityParams per cell type (index = type), or None to use ``pop.motility``.
    fields : FieldSet-like (``.values`` (nf, nz, ny, nx), ``.names``), a {name: (nz, ny, nx)}
        mapping, or None; only needed for chemotaxis.
    cell_list : a current CellList of width >= 2 max crowding radius, or None (built here when
        any type crowds).
    Ages advance by dt_min. Conditions found on the device (capped steps, cells in closed voxels,
    unknown types) raise bits in ``pop.flags`` (see Population.check_flags).
    """
    xp = pop.xp
    params = _as_params(pop, motility)
    ndim = grid.ndim
    vals, names = _stack_fields(xp, fields, grid)
    tp_h, tfield_h, radius, stiff = _tables(params, names, dt_min, ndim)
    open_ = _open_u8(xp, open_mask, grid)
    n = pop.n
    if n == 0:
        return
    if radius.max() > 0:
        width = 2.0 * float(radius.max())
        if cell_list is None or cell_list.width < width or cell_list.n != n:
            cell_list = build_cell_list(pop, grid, width)
        crowd = crowd_displacement(pop, cell_list, radius, stiff, dt_min)
    else:
        crowd = xp.zeros((n, 3), dtype=np.float32)
    k0, k1 = rng.seed_key(seed)
    max_disp = np.float32(MAX_DISP_FRACTION * grid.dx)
    if pop.be.is_gpu:
        nz, ny, nx = grid.shape
        ox, oy, oz = grid.origin
        K.launch(
            pop.be,
            "move_cells",
            n,
            (
                pop.position,
                pop.velocity,
                pop.type,
                pop.id,
                crowd,
                vals,
                device_constant(pop.be, tfield_h),
                device_constant(pop.be, tp_h),
                np.int32(len(params)),
                open_,
                np.int32(nx),
                np.int32(ny),
                np.int32(nz),
                np.float32(grid.dx),
                np.float32(ox),
                np.float32(oy),
                np.float32(oz),
                np.int32(n),
                np.float32(dt_min),
                np.uint32(step & 0xFFFFFFFF),
                np.uint32(k0),
                np.uint32(k1),
                np.int32(ndim),
                max_disp,
                pop.flags,
            ),
        )
    else:
        # in blocks of rows: every cell moves on its own (its own random numbers, read-only
        # fields), so the blocks give the cells of one call bit for bit, and the work arrays
        # (~330 B per cell) stay bounded however many cells there are
        for s0 in range(0, n, MOVE_BLOCK):
            s1 = min(s0 + MOVE_BLOCK, n)
            move_cells_numpy(
                pop.position[s0:s1],
                pop.velocity[s0:s1],
                pop.type[s0:s1],
                pop.id[s0:s1],
                crowd[s0:s1],
                vals,
                tfield_h,
                tp_h,
                open_,
                grid,
                s1 - s0,
                dt_min,
                step & 0xFFFFFFFF,
                k0,
                k1,
                ndim,
                max_disp,
                pop.flags,
            )
    pop.age[:n] += np.float32(dt_min)


def init_velocity(
    pop: Population, motility: Sequence[MotilityParams], ndim: int, seed: int, rows=None, start=None
) -> None:
    """Draw velocities from the stationary OU law (each axis N(0, s^2/d)) for ``rows`` (default all).

    Keyed by (seed, id, step 0xffffffff, PURPOSE_MOVE, draw 2), so it never repeats a move draw.
    Starting from the stationary law makes the Fuerth MSD hold from t = 0. ``start`` (instead of
    rows): the rows start .. pop.n - 1, e.g. cells just appended; on CuPy these take one launch
    of the kernel init_velocity_fill (same draws; Box-Muller's log/cos/sin are the GPU's; a
    type without motility parameters gets velocity 0 there, where the element-wise form raises).
    """
    xp = pop.xp
    params = _as_params(pop, motility)
    n = pop.n
    sig_h = np.array([p.speed_um_per_min / math.sqrt(ndim) for p in params], dtype=np.float32)
    if start is not None:
        if rows is not None:
            raise ValueError("init_velocity: give rows or start, not both")
        if pop.be.is_gpu:
            if n - start <= 0:
                return
            table = np.zeros(256, dtype=np.float32)
            table[: sig_h.shape[0]] = sig_h[:256]
            k0, k1 = rng.seed_key(seed)
            K.launch(
                pop.be,
                "init_velocity_fill",
                n - start,
                (
                    pop.id,
                    pop.type,
                    np.int64(start),
                    np.int32(n - start),
                    np.uint32(k0),
                    np.uint32(k1),
                    device_constant(pop.be, table),
                    np.int32(ndim),
                    pop.velocity,
                ),
            )
            return
        rows = xp.arange(start, n)
    rows = xp.arange(n) if rows is None else xp.asarray(rows)
    ids = pop.id[rows]
    r = rng.draw(ids, 0xFFFFFFFF, rng.PURPOSE_MOVE, 2, seed, xp=xp)
    z0, z1 = rng.box_muller(r[0], r[1], xp)
    z2, _ = rng.box_muller(r[2], r[3], xp)
    # a device constant: a copy from pageable host memory here would make the host wait for the
    # device at every step with arrivals or births
    sig = device_constant(pop.be, sig_h)
    s = sig[pop.type[rows].astype(np.int64)]
    v = xp.stack([z0 * s, z1 * s, z2 * s if ndim == 3 else xp.zeros_like(z2)], axis=1)
    pop.velocity[rows] = v.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# vessels
def vessel_sites(vessel_mask, xp=np):
    """Flat voxel indices (int64) of the vessel voxels (one sync: the count). Cache the result."""
    return xp.flatnonzero(xp.asarray(vessel_mask).reshape(-1) != 0).astype(np.int64)


def extravasate(
    pop: Population,
    grid: Grid,
    sites,
    cell_type: int,
    step: int,
    seed: int,
    expected_number: float | None = None,
    rate_per_min_per_vessel_voxel: float | None = None,
    dt_min: float | None = None,
    n_sites: int | None = None,
    number: int | None = None,
    **attrs,
):
    """Cells of ``cell_type`` entering the tissue from blood through vessel voxels.

    sites : int64 flat voxel indices from :func:`vessel_sites` (cache it: vessels are static).
    The number entering is Poisson with mean ``expected_number``, or
    rate_per_min_per_vessel_voxel x n_sites x dt_min; it is drawn on the host from Philox
    (stream = cell_type), so the birth count is known without a device sync. Each new cell sits
    in a uniformly chosen site at a uniform point inside the voxel (z at the slab centre in 2D),
    with zero velocity; its draws are keyed by its new id. ``number`` (optional) gives the count
    already drawn by the caller (e.g. one vectorised Poisson draw for all types). Returns the new ids.
    """
    xp = pop.xp
    if n_sites is None:
        n_sites = int(sites.shape[0])
    if expected_number is None and number is None:
        if rate_per_min_per_vessel_voxel is None or dt_min is None:
            raise ValueError("give expected_number, or rate_per_min_per_vessel_voxel and dt_min")
        expected_number = rate_per_min_per_vessel_voxel * n_sites * dt_min
    if n_sites == 0:
        return xp.zeros(0, dtype=np.int64)
    m = int(number) if number is not None else rng.poisson_host(expected_number, seed, step, int(cell_type))
    ids = xp.arange(pop.next_id, pop.next_id + m, dtype=np.int64)
    if m == 0:
        return ids
    r = rng.draw(ids, step, rng.PURPOSE_EXTRAVASATE, 0, seed, xp=xp)
    pick = xp.minimum((rng.uniform(r[0], xp).astype(np.float64) * n_sites).astype(np.int64), n_sites - 1)
    flat = xp.asarray(sites)[pick]
    nz, ny, nx = grid.shape
    k, rem = flat // (ny * nx), flat % (ny * nx)
    j, i = rem // nx, rem % nx
    ox, oy, oz = grid.origin
    dx = grid.dx
    pos = xp.empty((m, 3), dtype=np.float32)
    pos[:, 0] = ox + (i + rng.uniform(r[1], xp)) * dx
    pos[:, 1] = oy + (j + rng.uniform(r[2], xp)) * dx
    pos[:, 2] = oz + (k + (rng.uniform(r[3], xp) if nz > 1 else 0.5)) * dx
    # float32 rounding may land exactly on the upper voxel face: pull it back inside.
    for a, (o, c) in enumerate(((ox, i), (oy, j), (oz, k))):
        upper = (o + (c + 1) * dx).astype(np.float32)
        pos[:, a] = xp.where(pos[:, a] >= upper, xp.nextafter(upper, np.float32(-np.inf)), pos[:, a])
    got = pop.add(pos, xp.full(m, cell_type, dtype=np.uint8), **attrs)
    return got


def extravasate_many(pop: Population, grid: Grid, sites, counts, step: int, seed: int, n_sites=None) -> int:
    """Cells entering from blood, ``counts[t]`` (host ints) of each type t, in ascending type order.

    The same cells as :func:`extravasate` called with ``number=counts[t]`` for each t with a
    nonzero count, in that order (same ids, same Philox draws, same positions). On CuPy each type
    is one launch of the kernel extravasate_fill into a batch appended with one Population.add
    (some 30 small launches per type before). Returns the number of cells added.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if n_sites is None:
        n_sites = int(sites.shape[0])
    total = int(counts.sum())
    if total == 0 or n_sites == 0:
        return 0
    if not pop.be.is_gpu:
        for t in np.flatnonzero(counts).tolist():
            extravasate(pop, grid, sites, t, step, seed, n_sites=n_sites, number=int(counts[t]))
        return total
    xp = pop.xp
    sites = xp.ascontiguousarray(xp.asarray(sites, dtype=np.int64))  # the kernel reads int64
    pos = xp.empty((total, 3), dtype=np.float32)
    typ = xp.empty(total, dtype=np.uint8)
    k0, k1 = rng.seed_key(seed)
    nz, ny, nx = grid.shape
    ox, oy, oz = grid.origin
    f64 = np.float64
    row = 0
    for t in np.flatnonzero(counts).tolist():
        m = int(counts[t])
        K.launch(
            pop.be,
            "extravasate_fill",
            m,
            (
                sites,
                np.int64(n_sites),
                np.int32(t),
                np.int64(pop.next_id + row),
                np.int32(m),
                np.uint32(int(step) & 0xFFFFFFFF),
                np.uint32(rng.PURPOSE_EXTRAVASATE),
                np.uint32(k0),
                np.uint32(k1),
                np.int32(nz),
                np.int32(ny),
                np.int32(nx),
                f64(ox),
                f64(oy),
                f64(oz),
                f64(grid.dx),
                pos[row : row + m],
                typ[row : row + m],
            ),
        )
        row += m
    pop.add(pos, typ)
    return total


def intravasate(
    pop: Population,
    grid: Grid,
    vessel_mask,
    prob_per_min,
    dt_min: float,
    step: int,
    seed: int,
    type_filter=None,
    ntypes: int = 32,
):
    """Cells in vessel voxels leaving the tissue into blood; returns counts per type (int64 (ntypes,)).

    prob_per_min : exit rate (1/min), a scalar or per type (ntypes,); a cell in a vessel voxel
    leaves with probability 1 - exp(-rate dt). type_filter : types allowed to leave (None: all).
    The decision is keyed by (seed, id, step, PURPOSE_INTRAVASATE). The counts are a device
    array, but on CuPy this stand-alone form waits for the device several times (host tables
    copied up, cupy.bincount reading its input's range, Population.remove reading the new count);
    the step's own exits (Immunology.after_move) avoid all but the step's one read.
    """
    xp = pop.xp
    n = pop.n
    if n == 0:
        return xp.zeros(ntypes, dtype=np.int64)
    rate = np.broadcast_to(np.asarray(prob_per_min, dtype=np.float64), (ntypes,))
    p_exit = xp.asarray((-np.expm1(-rate * dt_min)).astype(np.float32))
    allowed = np.zeros(ntypes, dtype=bool)
    if type_filter is None:
        allowed[:] = True
    else:
        allowed[np.atleast_1d(np.asarray(type_filter, dtype=np.int64))] = True
    allowed = xp.asarray(allowed)
    vmask = xp.asarray(vessel_mask).reshape(-1) != 0
    in_vessel = vmask[grid.voxel_index(pop.position[:n], xp=xp)]
    t = pop.type[:n].astype(np.int64)
    r = rng.draw(pop.id[:n], step, rng.PURPOSE_INTRAVASATE, 0, seed, xp=xp)
    leave = in_vessel & allowed[t] & (rng.uniform(r[0], xp) < p_exit[t])
    counts = xp.bincount(t[leave], minlength=ntypes)[:ntypes]
    pop.remove(leave)
    return counts
