"""Neighbour search on a uniform cell list, contact queries and target claims.

The cell list sorts cells by bin: key = bin * n + index (unique keys, so every sort, stable or
not, on CPU or GPU, gives one order), ``order`` = argsort(key), and bin_start/bin_end from a
binary search of the sorted bins. Bins are cubes of edge ``width`` >= the interaction radius,
laid from the grid origin (ceil(L / width) per axis, one bin along z in 2D), so every partner
within the radius sits in the 3 x 3 (x 3) block of bins around a cell. Building costs one sort;
queries are O(n x cells per block).

Pair order (both backends): i ascending; for each i the neighbour bins in (dz, dy, dx)
lexicographic order from -1; j ascending inside a bin. CUDA: kernels/agents.cu (bin_keys,
count_pairs, write_pairs, crowd_displacement, claim_*); NumPy twins below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tissuesim.agents import _kernels as K
from tissuesim.agents.population import Population
from tissuesim.backend import device_constant
from tissuesim.grid import Grid

_U64MAX = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class CellList:
    """A built cell list.

    order : int32 (n,) cell indices sorted by (bin, index). bin_start, bin_end : int32 (nbins,)
    ranges into ``order``. width : bin edge in um. nb : (nbx, nby, nbz). origin : (x0, y0, z0) um.
    n : number of cells when built (the list is stale after any move, birth or death).
    """

    order: object
    bin_start: object
    bin_end: object
    width: float
    nb: tuple[int, int, int]
    origin: tuple[float, float, float]
    n: int

    def geometry_args(self) -> tuple:
        f = np.float32
        return (
            f(self.origin[0]),
            f(self.origin[1]),
            f(self.origin[2]),
            f(self.width),
            np.int32(self.nb[0]),
            np.int32(self.nb[1]),
            np.int32(self.nb[2]),
        )


def _bin_coords_numpy(pos, origin, width, nb, xp=np):
    f = np.float32
    out = []
    for a in range(3):
        c = xp.floor((pos[:, a] - f(origin[a])) / f(width)).astype(np.int64)
        out.append(xp.clip(c, 0, nb[a] - 1))
    return out


def bin_keys_numpy(pos, n, origin, width, nb):
    """NumPy twin of kernel bin_keys: int64 (n,) keys bin * n + index."""
    bx, by, bz = _bin_coords_numpy(pos[:n], origin, width, nb)
    b = (bz * nb[1] + by) * nb[0] + bx
    return b * np.int64(n) + np.arange(n, dtype=np.int64)


def build_cell_list(pop: Population, grid: Grid, width: float) -> CellList:
    """Sort the live cells of ``pop`` into bins of edge ``width`` um (>= any query radius)."""
    if not width > 0:
        raise ValueError(f"cell-list width must be > 0 um, got {width}")
    xp = pop.xp
    ext = grid.extent_um
    nb = tuple(max(1, math.ceil(ext[a] / width - 1e-9)) for a in range(3))
    if grid.nz == 1:
        nb = (nb[0], nb[1], 1)
    nbins = nb[0] * nb[1] * nb[2]
    if nbins * max(pop.n, 1) >= 2**62:
        raise ValueError("too many bins x cells for int64 keys; use a larger width")
    n = pop.n
    pos = pop.position
    if pop.be.is_gpu:
        key = xp.empty(n, dtype=np.int64)
        geo = CellList(None, None, None, float(width), nb, tuple(grid.origin), n).geometry_args()
        K.launch(pop.be, "bin_keys", n, (pos, np.int32(n), *geo, key))
    else:
        key = bin_keys_numpy(pos, n, grid.origin, width, nb)
    order = xp.argsort(key)
    # cells per bin by counting (O(n + nbins)); the sorted order makes each bin one range
    counts = xp.bincount(key // max(n, 1), minlength=nbins) if n else xp.zeros(nbins, dtype=np.int64)
    end = xp.cumsum(counts).astype(np.int32)
    start = end - counts.astype(np.int32)
    return CellList(order.astype(np.int32), start, end, float(width), nb, tuple(grid.origin), n)


_OFFSETS = [(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _padded_ranges(cl: CellList):
    """(cum, pad) of the bin grid padded with one layer of empty bins, cached on the list.

    cum : int64 (nbins_padded + 1,), padded bin k covers order[cum[k] : cum[k + 1]] (C order
    [z][y][x]); empty ghost bins have empty ranges in place, so the three bins of a row
    (dx = -1, 0, 1) around bin b are always the one contiguous range cum[b - 1] .. cum[b + 2].
    """
    cached = getattr(cl, "_pad", None)
    if cached is not None:
        return cached
    nbx, nby, nbz = cl.nb
    three_d = nbz > 1
    pad = (nbx + 2, nby + 2, nbz + 2 if three_d else 1)
    counts = np.zeros((pad[2], pad[1], pad[0]), dtype=np.int64)
    zs = slice(1, -1) if three_d else slice(0, 1)
    counts[zs, 1:-1, 1:-1] = (cl.bin_end - cl.bin_start).reshape(nbz, nby, nbx)
    cum = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts.reshape(-1))])
    cl._pad = (cum, pad)
    return cl._pad


def candidate_pairs_numpy(cl: CellList, pos, sources=None, ordered: bool = True):
    """All (i, j), i != j, with j in the 3x3(x3) bin block of i, in the kernels' pair order.

    pos : float32 (>= n, 3). sources : int64 indices allowed as i (ascending) or None for all.
    Vectorised over cells, one pass per row of bins (dz, dy): the row's three bins are one
    contiguous range of ``order`` (bins are sorted and the grid is padded with empty bins), and
    inside it cells come by (dx, j), the kernels' order. Only cells with a non-empty range are
    expanded. Returns int64 arrays (i, j); ``ordered=False`` skips the final sort by i (for
    order-free reductions such as the crowding sum).
    """
    n = cl.n
    if sources is None:
        sources = np.arange(n, dtype=np.int64)
    e = np.zeros(0, dtype=np.int64)
    if n == 0 or sources.size == 0:
        return e, e
    cum, (px, py, _pz) = _padded_ranges(cl)
    three_d = cl.nb[2] > 1
    bx, by, bz = _bin_coords_numpy(pos[sources], cl.origin, cl.width, cl.nb)
    pb = ((bz + (1 if three_d else 0)) * py + by + 1) * px + bx + 1
    order = cl.order.astype(np.int64)
    parts_i, parts_j = [], []
    rows = [(dz, dy) for dz in ((-1, 0, 1) if three_d else (0,)) for dy in (-1, 0, 1)]
    for dz, dy in rows:
        b = pb + (dz * py + dy) * px
        s = cum[b - 1]
        cnt = cum[b + 2] - s
        occ = np.flatnonzero(cnt)
        if occ.size == 0:
            continue
        cnt = cnt[occ]
        tot = int(cnt.sum())
        ii = np.repeat(sources[occ], cnt)
        first = np.cumsum(cnt) - cnt
        jj = order[np.arange(tot, dtype=np.int64) - np.repeat(first - s[occ], cnt)]
        keep = ii != jj
        parts_i.append(ii[keep])
        parts_j.append(jj[keep])
    if not parts_i:
        return e, e
    i = np.concatenate(parts_i)
    j = np.concatenate(parts_j)
    if not ordered:
        return i, j
    srt = np.argsort(i, kind="stable")  # (i, row, dx, j): rows were concatenated in order
    return i[srt], j[srt]


def type_mask(types) -> int:
    """uint32 bit set of cell types (None = all 32)."""
    if types is None:
        return 0xFFFFFFFF
    if isinstance(types, (int, np.integer)):
        types = [types]
    m = 0
    for t in types:
        if not 0 <= int(t) < 32:
            raise ValueError(f"cell type {t} outside 0..31")
        m |= 1 << int(t)
    return m


@dataclass
class Pairs:
    """Contact pairs: i, j int32 arrays (source, target row indices).

    Exact queries: length == n (host int). Non-exact (``exact=False``): buffers of length
    capacity padded with -1, ``n`` None and ``n_device`` the true count on the device (may exceed
    the capacity; then FLAG_PAIR_OVERFLOW is set and the pairs past capacity are missing).
    """

    i: object
    j: object
    n: int | None
    n_device: object = None


def _pair_r2_numpy(pos, i, j):
    d = pos[j] - pos[i]
    return d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]


def contacts_numpy(pos, type_, cl: CellList, r2max, src_mask: int, tgt_mask: int):
    """NumPy twin of count_pairs + write_pairs: int64 (i, j) in pair order, |x_i - x_j|^2 < r2max."""
    n = cl.n
    t = type_[:n].astype(np.int64)
    src = np.flatnonzero(
        (t < 32) & ((np.uint64(src_mask) >> np.minimum(t, 31).astype(np.uint64)) & np.uint64(1) != 0)
    )
    i, j = candidate_pairs_numpy(cl, pos, src)
    if i.size == 0:
        return i, j
    tgt_ok = np.zeros(256, dtype=bool)  # types >= 32 never match a mask
    tgt_ok[:32] = ((np.uint64(tgt_mask) >> np.arange(32, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    ok = np.flatnonzero(tgt_ok[t[j]])
    i, j = i[ok], j[ok]
    x, y, z = (np.ascontiguousarray(pos[:n, a]) for a in range(3))
    dx, dy, dz = x[j] - x[i], y[j] - y[i], z[j] - z[i]
    r2 = dx * dx + dy * dy + dz * dz
    ok = np.flatnonzero(r2 < np.float32(r2max))
    return i[ok], j[ok]


def contacts(
    pop: Population,
    radius: float,
    source_types=None,
    target_types=None,
    *,
    grid: Grid | None = None,
    cell_list: CellList | None = None,
    exact: bool = True,
) -> Pairs:
    """All pairs (i, j), i != j, |x_i - x_j| < radius um, type(i) in source_types, type(j) in target_types.

    Give ``cell_list`` (built with width >= radius on the current positions) or ``grid`` (a list
    is built). ``exact=True`` reads the pair count back (one 8-byte sync on the GPU) and sizes the
    buffer to fit, so no pair is ever lost. ``exact=False`` never syncs: pairs go into a buffer of
    ``pop.pair_capacity`` rows (-1 padded), an overflow sets FLAG_PAIR_OVERFLOW and
    ``pop.check_flags()`` then grows the buffer for later queries.
    Indices are rows of ``pop`` (int32); the order is the fixed pair order of this module.
    """
    xp = pop.xp
    if cell_list is None:
        if grid is None:
            raise ValueError("contacts needs a cell_list or a grid")
        cell_list = build_cell_list(pop, grid, radius)
    if cell_list.width < radius * (1 - 1e-6):
        raise ValueError(f"cell list width {cell_list.width} um < contact radius {radius} um: rebuild it")
    if cell_list.n != pop.n:
        raise ValueError("cell list is stale (population size changed); rebuild it")
    n = pop.n
    r2 = np.float32(np.float32(radius) * np.float32(radius))
    sm, tm = type_mask(source_types), type_mask(target_types)
    if not exact and pop.pair_capacity == 0:
        pop.pair_capacity = max(1024, 16 * n)
    if not pop.be.is_gpu:
        i, j = contacts_numpy(pop.position, pop.type, cell_list, r2, sm, tm)
        i, j = i.astype(np.int32), j.astype(np.int32)
        if exact:
            return Pairs(i, j, int(i.size), np.int64(i.size))
        cap = pop.pair_capacity
        total = i.size
        pop._last_pair_total = np.int64(total)
        if total > cap:
            pop.flags[0] |= np.uint32(K.FLAG_PAIR_OVERFLOW)
        bi = np.full(cap, -1, dtype=np.int32)
        bj = np.full(cap, -1, dtype=np.int32)
        m = min(cap, total)
        bi[:m], bj[:m] = i[:m], j[:m]
        return Pairs(bi, bj, None, np.int64(total))
    geo = cell_list.geometry_args()
    common = (
        pop.position,
        pop.type,
        cell_list.order,
        cell_list.bin_start,
        cell_list.bin_end,
        np.int32(n),
        *geo,
    )
    counts = xp.empty(n, dtype=np.int64)
    K.launch(pop.be, "count_pairs", n, (*common, r2, np.uint32(sm), np.uint32(tm), counts))
    csum = xp.cumsum(counts) if n else xp.zeros(1, dtype=np.int64)
    offsets = csum - counts if n else counts
    total = csum[-1] if n else xp.zeros((), dtype=np.int64)
    if exact:
        cap = int(total)
    else:
        cap = pop.pair_capacity
        pop._last_pair_total = total
    pi = xp.full(max(cap, 0), -1, dtype=np.int32)
    pj = xp.full(max(cap, 0), -1, dtype=np.int32)
    K.launch(
        pop.be,
        "write_pairs",
        n,
        (*common, r2, np.uint32(sm), np.uint32(tm), offsets, np.int64(cap), pi, pj, pop.flags),
    )
    return Pairs(pi, pj, cap if exact else None, total)


# ---------------------------------------------------------------------------------------------
# crowding
def crowd_displacement_numpy(pos, type_, ids, cl: CellList, radius, stiff, dt):
    """NumPy twin of kernel crowd_displacement: float32 (n, 3) um (see agents.cu for the law)."""
    n = cl.n
    out = np.zeros((n, 3), dtype=np.float32)
    t = type_[:n].astype(np.int64)
    active = np.flatnonzero(radius[t] > 0)
    i, j = candidate_pairs_numpy(cl, pos, active, ordered=False)
    if i.size == 0:
        return out
    # cheap filter first on contiguous coordinate columns (most candidates do not overlap)
    x, y, z = (np.ascontiguousarray(pos[:n, a]) for a in range(3))
    ux, uy, uz = x[i] - x[j], y[i] - y[j], z[i] - z[j]
    r2 = ux * ux + uy * uy + uz * uz
    rmax = np.float32(2 * radius.max())
    near = np.flatnonzero(r2 < rmax * rmax)
    i, j, r2 = i[near], j[near], r2[near]
    u = np.stack([ux[near], uy[near], uz[near]], axis=1)
    R = radius[t[i]] + radius[t[j]]
    ov = (radius[t[j]] > 0) & (radius[t[i]] > 0) & (r2 < R * R)
    i, j, R, u, r2 = i[ov], j[ov], R[ov], u[ov], r2[ov]
    f = np.float32(0.5) * (stiff[t[i]] + stiff[t[j]]) * np.float32(dt)
    f = np.minimum(f, np.float32(1.0))
    pos_r = r2 > 0
    r = np.sqrt(np.where(pos_r, r2, np.float32(1.0)))
    m = np.where(pos_r, f * np.float32(0.5) * (R - r) / r, np.float32(0.0))
    contrib = u * m[:, None]
    coincident = ~pos_r
    if coincident.any():
        mc = f * np.float32(0.5) * R
        sign = np.where(ids[i] < ids[j], np.float32(-1.0), np.float32(1.0))
        contrib[:, 0] = np.where(coincident, sign * mc, contrib[:, 0])
    for a in range(3):
        out[:, a] = np.bincount(i, weights=contrib[:, a], minlength=n).astype(np.float32)
    return out


def crowd_displacement(pop: Population, cl: CellList, radius_by_type, stiffness_by_type, dt: float):
    """Crowding displacement of every live cell over dt minutes, float32 (n, 3) um.

    radius_by_type : float32 (ntypes,) um (0: the type does not crowd); stiffness_by_type :
    float32 (ntypes,) 1/min. ``cl`` must have width >= 2 max(radius).
    """
    xp = pop.xp
    # Tables over all 256 uint8 types, zero past the given ones: a type without parameters (which
    # move_cells flags as FLAG_BAD_TYPE) does not crowd, and no lookup reads past the tables.
    # Built on the host and put on the device once per content (device_constant): no copy and
    # no host wait inside the step.
    radius = np.zeros(256, dtype=np.float32)
    stiff = np.zeros(256, dtype=np.float32)
    r_in = np.asarray(pop.be.asnumpy(radius_by_type), dtype=np.float32).reshape(-1)[:256]
    k_in = np.asarray(pop.be.asnumpy(stiffness_by_type), dtype=np.float32).reshape(-1)[:256]
    radius[: r_in.shape[0]] = r_in
    stiff[: k_in.shape[0]] = k_in
    radius, stiff = device_constant(pop.be, radius), device_constant(pop.be, stiff)
    n = pop.n
    if pop.be.is_gpu:
        disp = xp.zeros((n, 3), dtype=np.float32)
        K.launch(
            pop.be,
            "crowd_displacement",
            n,
            (
                pop.position,
                pop.type,
                pop.id,
                cl.order,
                cl.bin_start,
                cl.bin_end,
                np.int32(n),
                *cl.geometry_args(),
                radius,
                stiff,
                np.float32(dt),
                disp,
            ),
        )
        return disp
    return crowd_displacement_numpy(pop.position, pop.type, pop.id, cl, radius, stiff, dt)


# ---------------------------------------------------------------------------------------------
# claims
def claim_targets(pop: Population, pairs: Pairs, source_ok=None, target_ok=None, rounds: int = 1):
    """Match sources to targets: each source takes at most one target, each target at most one source.

    In each round every eligible source proposes its nearest eligible, untaken partner among
    ``pairs`` (ties: the lowest index, i.e. the lowest id); each proposed target goes to the
    proposing source of LOWEST id; winners and their targets leave the later rounds, so losers
    may try their next-nearest partner. Only integer min-reductions decide: the result is
    deterministic and the same on both backends.

    source_ok, target_ok : bool (n,) eligibility (e.g. not engaged, alive) or None (all).
    Returns (target_of, taken_by): int32 (n,) target row of each source / source row of each
    target, -1 where none.
    """
    xp = pop.xp
    n = pop.n
    src_ok = xp.ones(n, dtype=np.uint8) if source_ok is None else xp.asarray(source_ok[:n]).astype(np.uint8)
    tgt_ok = xp.ones(n, dtype=np.uint8) if target_ok is None else xp.asarray(target_ok[:n]).astype(np.uint8)
    target_of = xp.full(n, -1, dtype=np.int32)
    taken_by = xp.full(n, -1, dtype=np.int32)
    pi = xp.asarray(pairs.i, dtype=np.int32)  # the kernels take int32 rows
    pj = xp.asarray(pairs.j, dtype=np.int32)
    npairs = int(pi.shape[0])
    if n == 0 or npairs == 0:
        return target_of, taken_by
    for _ in range(int(rounds)):
        best = xp.full(n, _U64MAX, dtype=np.uint64)
        winner = xp.full(n, _U64MAX, dtype=np.uint64)
        if pop.be.is_gpu:
            K.launch(
                pop.be,
                "claim_choose",
                npairs,
                (pi, pj, np.int64(npairs), pop.position, src_ok, tgt_ok, taken_by, best),
            )
            K.launch(pop.be, "claim_resolve", n, (best, pop.id, np.int32(n), winner))
            K.launch(
                pop.be, "claim_commit", n, (best, winner, pop.id, np.int32(n), target_of, taken_by, src_ok)
            )
        else:
            claim_round_numpy(
                pi, pj, pop.position, pop.id[:n], src_ok, tgt_ok, taken_by, target_of, best, winner
            )
    return target_of, taken_by


def claim_round_numpy(pi, pj, pos, ids, src_ok, tgt_ok, taken_by, target_of, best, winner):
    """NumPy twin of claim_choose + claim_resolve + claim_commit (updates arrays in place)."""
    i = pi.astype(np.int64)
    j = pj.astype(np.int64)
    v = (i >= 0) & (j >= 0)
    i, j = i[v], j[v]
    v = (src_ok[i] != 0) & (tgt_ok[j] != 0) & (taken_by[j] < 0)
    i, j = i[v], j[v]
    r2 = _pair_r2_numpy(pos, j, i)  # x_i - x_j, as the kernel
    key = (r2.astype(np.float32).view(np.uint32).astype(np.uint64) << np.uint64(32)) | j.astype(np.uint64)
    np.minimum.at(best, i, key)
    src = np.flatnonzero(best != _U64MAX)
    tj = (best[src] & np.uint64(0xFFFFFFFF)).astype(np.int64)
    np.minimum.at(winner, tj, ids[src].astype(np.uint64))
    won = winner[tj] == ids[src].astype(np.uint64)
    s, t = src[won], tj[won]
    target_of[s] = t
    taken_by[t] = s
    src_ok[s] = 0
