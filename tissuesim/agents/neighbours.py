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
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from tissuesim.agents import _kernels as K
from tissuesim.agents.population import Population
from tissuesim.backend import device_constant
from tissuesim.grid import Grid

_U64MAX = np.uint64(0xFFFFFFFFFFFFFFFF)

#: bin-grid buffers of NumPy cell lists, per thread: tag -> (buffer, weak reference to its list)
_POOL = threading.local()


def _pooled(tag: str, n: int, dtype, owner=None) -> np.ndarray:
    """A 1-D array of n elements of dtype (contents undefined) for a NumPy cell list's tables.

    owner : the CellList that keeps the array (None: used only inside the calling function).
    One list is built and dropped per query in a step, so the buffer of the last list is free by
    the next build: it is handed out again once its owner list is gone (a weak reference, which
    CPython clears when the last reference to the list goes), otherwise, or when too small, a
    fresh one is made. A list that is still held keeps its own.
    """
    pool = getattr(_POOL, "d", None)
    if pool is None:
        pool = _POOL.d = {}
    buf, ref = pool.get(tag, (None, None))
    if buf is None or buf.dtype != dtype or buf.size < n or (ref is not None and ref() is not None):
        buf = np.empty(n, dtype=dtype)
    pool[tag] = (buf, None if owner is None else weakref.ref(owner))
    return buf[:n]


@dataclass
class CellList:
    """A built cell list.

    order : int32 (n,) cell indices sorted by (bin, index). bin_start, bin_end : int32 (nbins,)
    ranges into ``order`` (a NumPy build derives them from its padded ranges when first asked:
    its own queries use those, so a step makes no bin-grid copies). width : bin edge in um. nb : (nbx, nby, nbz). origin : (x0, y0, z0) um.
    n : number of cells when built (the list is stale after any move, birth or death).
    """

    order: object
    _start: object
    _end: object
    width: float
    nb: tuple[int, int, int]
    origin: tuple[float, float, float]
    n: int

    @property
    def bin_start(self):
        if self._start is None:
            self._start, self._end = _ranges_from_padded(self)
        return self._start

    @property
    def bin_end(self):
        if self._end is None:
            self._start, self._end = _ranges_from_padded(self)
        return self._end

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
        if nb[a] == 1 and xp is np:  # clipped to [0, 0] whatever the position (NaN included)
            out.append(np.zeros(pos.shape[0], dtype=np.int64))
            continue
        c = xp.floor((pos[:, a] - f(origin[a])) / f(width)).astype(np.int64)
        xp.maximum(c, 0, out=c)  # = clip(c, 0, nb - 1)
        out.append(xp.minimum(c, nb[a] - 1, out=c))
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
    if not pop.be.is_gpu:
        return _build_cell_list_numpy(pos, n, tuple(grid.origin), float(width), nb)
    key = xp.empty(n, dtype=np.int64)
    geo = CellList(None, None, None, float(width), nb, tuple(grid.origin), n).geometry_args()
    K.launch(pop.be, "bin_keys", n, (pos, np.int32(n), *geo, key))
    order = xp.argsort(key)
    start, end = bin_ranges_of_keys(pop.be, key, order, n, nbins)
    return CellList(order.astype(np.int32), start, end, float(width), nb, tuple(grid.origin), n)


def bin_ranges_of_keys(be, key, order, n: int, nbins: int):
    """:func:`bin_ranges` of the cell-list keys ``key`` (bin * n + index, int64 (n,)) in their
    sorted ``order`` (int64 (n,)): int32 (nbins,) start and end. On CuPy one launch of
    bin_ranges_fill (agents.cu) instead of a gather, a division, two searches and two casts."""
    xp = be.xp
    if not be.is_gpu:
        return bin_ranges(xp, key[order] // max(n, 1), nbins)
    start = xp.empty(nbins, dtype=np.int32)
    end = xp.empty(nbins, dtype=np.int32)
    K.launch(be, "bin_ranges_fill", nbins, (key, order, np.int32(n), np.int64(nbins), start, end))
    return start, end


def bin_ranges(xp, sorted_bins, nbins: int):
    """Row range [start, end) of each bin in ``sorted_bins`` (int64 (n,), ascending), int32 (nbins,).

    Two binary searches per bin (O(nbins log n)) instead of a bincount: CuPy's bincount reads
    the largest bin back to the host to size its result (a sync in every step's cell list).
    """
    b = xp.arange(nbins, dtype=sorted_bins.dtype)
    start = xp.searchsorted(sorted_bins, b, side="left").astype(np.int32)
    end = xp.searchsorted(sorted_bins, b, side="right").astype(np.int32)
    return start, end


def _sort_by_bin(b, n: int, nbins: int):
    """int32 (n,) argsort of the keys b * n + index, i.e. cells by (bin, index).

    A stable sort by bin gives exactly that order: LSD radix sort in 16-bit digits (NumPy's
    stable argsort of uint16 is a radix sort), else a sort of the unique int64 keys.
    """
    if nbins <= 1 << 16:
        return np.argsort(b.astype(np.uint16), kind="stable").astype(np.int32)
    if nbins <= 1 << 32:
        o = np.argsort((b & 0xFFFF).astype(np.uint16), kind="stable")
        o2 = np.argsort((b >> 16).astype(np.uint16)[o], kind="stable")
        return o[o2].astype(np.int32)
    key = b * np.int64(n)
    key += np.arange(n, dtype=np.int64)
    key.sort()
    return (key % max(n, 1)).astype(np.int32)


def _pad_geometry(nb) -> tuple[int, int, int]:
    """(px, py, pz): the bin grid with one layer of empty ghost bins (x, y; and z in 3D)."""
    return (nb[0] + 2, nb[1] + 2, nb[2] + 2 if nb[2] > 1 else 1)


def _padded_bins(bx, by, bz, nb):
    """Flat index of bin (bx, by, bz) in the padded bin grid (C order [z][y][x])."""
    px, py, _ = _pad_geometry(nb)
    if nb[2] > 1:
        bz = bz + 1
    pb = bz * py
    pb += by
    pb += 1
    pb *= px
    pb += bx
    pb += 1
    return pb


def _build_cell_list_numpy(pos, n, origin, width, nb) -> CellList:
    """The NumPy twin of bin_keys + sort + bin ranges, plus the state the NumPy queries reuse.

    Same list as the GPU path: ``order`` = argsort(bin * n + index) (see _sort_by_bin). The
    padded bin ranges (see _padded_ranges), the build positions and their padded bins are kept on
    the list for the queries.
    """
    nbins = nb[0] * nb[1] * nb[2]
    p = pos[:n]
    bx, by, bz = _bin_coords_numpy(p, origin, width, nb)
    b = (bz * nb[1] + by) * nb[0] + bx
    order = _sort_by_bin(b, n, nbins)
    px, py, pz = pad = _pad_geometry(nb)
    pbin = _padded_bins(bx, by, bz, nb)
    cdt = np.int32 if n < 2**31 else np.int64  # ranges index `order`
    # counts per padded bin, summed in place into the ranges (no bin-grid temporaries)
    cl = CellList(order, None, None, width, nb, origin, n)  # bin ranges: see CellList
    cum = _pooled("cum", px * py * pz + 1, cdt, owner=cl)
    cum.fill(0)
    np.add.at(cum[1:], pbin, 1)
    np.cumsum(cum[1:], out=cum[1:])
    cl._pad = (cum, pad)
    cl._snap = _Snapshot(p.copy(), pbin)
    return cl


class _Snapshot:
    """Positions a CellList's NumPy queries last saw, their padded bins and the pairs found then."""

    __slots__ = ("cand", "cand_reach2", "pbin", "pos")

    def __init__(self, pos, pbin):
        self.pos = pos
        self.pbin = pbin
        self.cand = None  # (i, j, r2) over every cell as source, r2 < cand_reach2, pair order
        self.cand_reach2 = None


def _snapshot(cl: CellList, pos) -> _Snapshot:
    """The list's snapshot for the current positions ``pos[:n]`` (rebuilt when they changed).

    Queries only reuse what was derived from bit-identical positions, so cached pairs are exactly
    the pairs a fresh search would give (also for a stale list, whose ``order`` is kept as is).
    """
    n = cl.n
    p = pos[:n]
    snap = getattr(cl, "_snap", None)
    if snap is not None and np.array_equal(snap.pos.view(np.uint32), p.view(np.uint32)):
        return snap
    bx, by, bz = _bin_coords_numpy(p, cl.origin, cl.width, cl.nb)
    cl._snap = snap = _Snapshot(p.copy(), _padded_bins(bx, by, bz, cl.nb))
    return snap


def _ranges_from_padded(cl: CellList):
    """(bin_start, bin_end) int32 (nbins,) of a NumPy-built list, from its padded ranges."""
    cum, (px, py, pz) = cl._pad
    zs = slice(1, -1) if cl.nb[2] > 1 else slice(0, 1)
    nbins = cl.nb[0] * cl.nb[1] * cl.nb[2]
    start = cum[:-1].reshape(pz, py, px)[zs, 1:-1, 1:-1].astype(np.int32).reshape(nbins)
    end = cum[1:].reshape(pz, py, px)[zs, 1:-1, 1:-1].astype(np.int32).reshape(nbins)
    return start, end


def _padded_ranges(cl: CellList):
    """(cum, pad) of the bin grid padded with one layer of empty bins, cached on the list.

    cum : int64, or int32 from _build_cell_list_numpy (nbins_padded + 1,), padded bin k covers order[cum[k] : cum[k + 1]] (C order
    [z][y][x]); empty ghost bins have empty ranges in place, so the three bins of a row
    (dx = -1, 0, 1) around bin b are always the one contiguous range cum[b - 1] .. cum[b + 2].
    """
    cached = getattr(cl, "_pad", None)
    if cached is not None:
        return cached
    nbx, nby, nbz = cl.nb
    pad = _pad_geometry(cl.nb)
    counts = np.zeros((pad[2], pad[1], pad[0]), dtype=np.int64)
    zs = slice(1, -1) if nbz > 1 else slice(0, 1)
    counts[zs, 1:-1, 1:-1] = (np.asarray(cl.bin_end) - np.asarray(cl.bin_start)).reshape(nbz, nby, nbx)
    cum = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts.reshape(-1))])
    cl._pad = (cum, pad)
    return cl._pad


def _row_tables(cl: CellList):
    """(start, count3) per padded bin b, cached: the row of bins b, b + 1, b + 2 is the range
    order[start[b] : start[b] + count3[b]] (= cum[b] .. cum[b + 3]). Narrow dtypes (count3 mostly
    uint8) keep these randomly accessed tables small enough for the CPU caches."""
    cached = getattr(cl, "_rows", None)
    if cached is not None:
        return cached
    cum, _ = _padded_ranges(cl)
    m = max(cum.size - 3, 0)
    c3 = np.subtract(cum[3:], cum[:-3], out=_pooled("c3", m, cum.dtype))
    top = int(c3.max()) if c3.size else 0
    cdt = np.uint8 if top <= 0xFF else (np.uint16 if top <= 0xFFFF else np.int64)
    sdt = np.int32 if cl.n < 2**31 else np.int64
    start = cum[:-3] if cum.dtype == sdt else cum[:-3].astype(sdt)
    narrow = _pooled(f"c3_{np.dtype(cdt).str}", m, cdt, owner=cl)
    narrow[...] = c3
    cl._rows = (start, narrow)
    return cl._rows


def _row_offsets(cl: CellList):
    """Offsets from a cell's padded bin to the first bin (dx = -1) of each row (dz, dy) of its
    block, (dz, dy) lexicographic."""
    px, py, _ = _pad_geometry(cl.nb)
    dzs = (-1, 0, 1) if cl.nb[2] > 1 else (0,)
    return np.array([(dz * py + dy) * px - 1 for dz in dzs for dy in (-1, 0, 1)], dtype=np.int64)


def _expand_pairs(cl: CellList, pbin, sources):
    """(i, j) int64 of every cell j in the bin block of each source i, i != j, in pair order.

    pbin : padded bin of each source; sources : int64 ascending (None: all n cells). One pass
    for all rows: the (source, row) ranges in C order are (i, dz, dy) lexicographic, and inside
    a row's range cells come by (dx, j), so the output is in the kernels' order without a sort.
    """
    start, count3 = _row_tables(cl)
    b = pbin[:, None] + _row_offsets(cl)  # first bin (dx = -1) of each row (dz, dy)
    cnt = count3[b]
    per_src = cnt.sum(axis=1, dtype=np.int64)
    b = b.reshape(-1)
    occ = np.flatnonzero(cnt.reshape(-1) != 0)  # (nonzero is fastest on bool)
    cnt = cnt.reshape(-1)[occ].astype(np.int64)
    s = start[b[occ]].astype(np.int64)
    tot = int(per_src.sum())
    e = np.zeros(0, dtype=np.int64)
    if tot == 0:
        return e, e
    src = np.arange(pbin.shape[0], dtype=np.int64) if sources is None else sources
    ii = np.repeat(src, per_src)
    # position in `order` of each pair: the ranges s .. s + cnt - 1 one after the other, as a
    # running sum of steps that are 1 inside a range and jump to the next range's start
    first = np.cumsum(cnt)
    first -= cnt
    step = np.ones(tot, dtype=np.int64)
    step[0] = s[0]
    jump = s[1:] - s[:-1]
    jump -= cnt[:-1]
    jump += 1
    step[first[1:]] = jump
    k = np.cumsum(step, out=step)
    jj = cl.order[k].astype(np.int64)
    keep = np.flatnonzero(ii != jj)
    if keep.size != tot:
        ii, jj = ii[keep], jj[keep]
    return ii, jj


def _columns(pos, n):
    return tuple(np.ascontiguousarray(pos[:n, a]) for a in range(3))


#: sources whose candidate pairs are expanded at a time: the expansion's work arrays (~40 B per
#: candidate pair, ~20-70 candidates per source: some 2-6 MB) stay bounded whatever the number of
#: cells, and only the pairs within reach are kept (they still grow with the cells)
PAIR_BLOCK = 2048


def list_reach2(cl: CellList) -> np.float32:
    """The farthest a query on the list may reach, squared (um^2, float32): its width, with the
    1e-6 relative tolerance of the width checks (contacts: radius <= width; crowd_displacement:
    2 max radius <= width) and float32 rounding. Pairs farther apart than the width are not all
    in the 3x3(x3) bin block, so a query past it would miss some."""
    w = np.float32(cl.width)
    return np.float32(w * w * np.float32(1 + 4e-6))


def _pairs_within(cl: CellList, pos, pbin, sources, reach2):
    """(i, j, r2) of the candidate pairs of ``sources`` (int64 ascending; None: all cells, pbin
    then of all cells) with r2 < reach2 (float32), in pair order.

    Expanded PAIR_BLOCK sources at a time: pairs come source by source, so the blocks' pairs one
    after the other are the pairs of one expansion, in the same order with the same r2."""
    nsrc = pbin.shape[0]
    if nsrc == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0, dtype=np.float32)
    x, y, z = _columns(pos, cl.n)
    parts = []
    for s0 in range(0, nsrc, PAIR_BLOCK):
        s1 = min(s0 + PAIR_BLOCK, nsrc)
        src = np.arange(s0, s1, dtype=np.int64) if sources is None else sources[s0:s1]
        i, j = _expand_pairs(cl, pbin[s0:s1], src)
        r2 = _r2(x, y, z, i, j)
        k = np.flatnonzero(r2 < reach2)
        if k.size != i.size:
            i, j, r2 = i[k], j[k], r2[k]
        parts.append((i, j, r2))
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(a) for a in zip(*parts))


def _all_candidates(cl: CellList, pos, reach2):
    """(i, j, r2, kept2): every cell as a source, the pairs with r2 < kept2 (>= reach2), in pair
    order; r2 = |x_j - x_i|^2 (float32).

    Cached on the list for bit-identical positions with the reach of the query that made them:
    a later query on the list that reaches no farther (contacts and crowding on one list) filters
    them; one that reaches farther finds them again."""
    snap = _snapshot(cl, pos)
    if snap.cand is None or snap.cand_reach2 < reach2:
        snap.cand = _pairs_within(cl, pos, snap.pbin, None, reach2)
        snap.cand_reach2 = reach2
    return (*snap.cand, snap.cand_reach2)


def _r2(x, y, z, i, j):
    """|x_j - x_i|^2 in float32, summed x, y, z (as the kernels)."""
    d = x[j]
    d -= x[i]
    r2 = d * d
    d = y[j]
    d -= y[i]
    d *= d
    r2 += d
    d = z[j]
    d -= z[i]
    d *= d
    r2 += d
    return r2


def _use_all(cl: CellList, nsrc: int, reach2) -> bool:
    """Find (or reuse) the pairs of every cell rather than of the sources only."""
    snap = getattr(cl, "_snap", None)
    return 4 * nsrc >= cl.n or (snap is not None and snap.cand is not None and snap.cand_reach2 >= reach2)


def _candidates_for(cl: CellList, pos, sources, reach2, src_mask=None):
    """(i, j, r2, exact) of the candidate pairs of ``sources`` (int64 ascending, None = all) in
    pair order: every pair with r2 < reach2 (float32, the query's own cut), and when ``exact`` is
    false some farther ones too (pairs cached by a query that reached farther).

    src_mask : bool (n,) of the sources (optional, saves building it)."""
    n = cl.n
    nsrc = n if sources is None else int(sources.size)
    if reach2 > list_reach2(cl):
        raise ValueError(f"query reach^2 {reach2} um^2 beyond the cell list's width {cl.width} um")
    if sources is None or _use_all(cl, nsrc, reach2):
        i, j, r2, kept2 = _all_candidates(cl, pos, reach2)
        exact = bool(kept2 == reach2)
        if nsrc == n:
            return i, j, r2, exact
        if src_mask is None:
            src_mask = np.zeros(n, dtype=bool)
            src_mask[sources] = True
        keep = np.flatnonzero(src_mask[i])
        return i[keep], j[keep], r2[keep], exact
    snap = _snapshot(cl, pos)
    return (*_pairs_within(cl, pos, snap.pbin[sources], sources, reach2), True)


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


def _type_bits(mask: int) -> np.ndarray:
    """bool (256,): types in the uint32 bit set ``mask`` (types >= 32 never match)."""
    ok = np.zeros(256, dtype=bool)
    ok[:32] = ((np.uint64(mask) >> np.arange(32, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    return ok


def contacts_numpy(pos, type_, cl: CellList, r2max, src_mask: int, tgt_mask: int):
    """NumPy twin of count_pairs + write_pairs: int64 (i, j) in pair order, |x_i - x_j|^2 < r2max."""
    n = cl.n
    e = np.zeros(0, dtype=np.int64)
    if n == 0:
        return e, e
    t = type_[:n]
    is_src = _type_bits(src_mask)[t]
    src = np.flatnonzero(is_src)
    if src.size == 0:
        return e, e
    tgt_ok = _type_bits(tgt_mask)[t]
    r2max = np.float32(r2max)
    i, j, r2, exact = _candidates_for(cl, pos, None if src.size == n else src, r2max, is_src)
    if i.size == 0:
        return e, e
    ok = tgt_ok[j]
    if not exact:
        ok &= r2 < r2max
    ok = np.flatnonzero(ok)
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
    if n == 0:
        return out
    t = type_[:n]
    rc = radius[t]  # per-cell radius and stiffness (same values as radius[t[i]] per pair)
    is_src = rc > 0
    nsrc = int(np.count_nonzero(is_src))
    if nsrc == 0:
        return out
    sources = None if nsrc == n else np.flatnonzero(is_src)
    rmax = np.float32(2 * radius.max())
    i, j, r2, exact = _candidates_for(cl, pos, sources, np.float32(rmax * rmax), is_src)
    if i.size == 0:
        return out
    x, y, z = _columns(pos, n)
    if not exact:  # cheap filter first (most candidates do not overlap)
        near = np.flatnonzero(r2 < rmax * rmax)
        i, j, r2 = i[near], j[near], r2[near]
    ri, rj = rc[i], rc[j]
    R = ri + rj
    ov = rj > 0
    ov &= ri > 0
    ov &= r2 < R * R
    ov = np.flatnonzero(ov)
    i, j, R, r2 = i[ov], j[ov], R[ov], r2[ov]
    ux, uy, uz = x[i] - x[j], y[i] - y[j], z[i] - z[j]
    kc = stiff[t]
    f = np.float32(0.5) * (kc[i] + kc[j]) * np.float32(dt)
    f = np.minimum(f, np.float32(1.0))
    pos_r = r2 > 0
    r = np.sqrt(np.where(pos_r, r2, np.float32(1.0)))
    m = np.where(pos_r, f * np.float32(0.5) * (R - r) / r, np.float32(0.0))
    cx, cy, cz = ux * m, uy * m, uz * m
    coincident = ~pos_r
    if coincident.any():
        mc = f * np.float32(0.5) * R
        sign = np.where(ids[i] < ids[j], np.float32(-1.0), np.float32(1.0))
        cx = np.where(coincident, sign * mc, cx)
    for a, c in enumerate((cx, cy, cz)):
        out[:, a] = np.bincount(i, weights=c, minlength=n)
    return out


_CROWD_TABLES: dict = {}


def _crowd_tables(r_in, k_in):
    """(radius, stiffness) float32 (256,) tables, zero past the given types; cached by content."""
    key = (r_in.tobytes(), k_in.tobytes())
    tables = _CROWD_TABLES.get(key)
    if tables is None:
        radius = np.zeros(256, dtype=np.float32)
        stiff = np.zeros(256, dtype=np.float32)
        radius[: r_in.shape[0]] = r_in
        stiff[: k_in.shape[0]] = k_in
        radius.flags.writeable = stiff.flags.writeable = False  # shared: never written
        if len(_CROWD_TABLES) >= 64:
            _CROWD_TABLES.clear()
        tables = _CROWD_TABLES[key] = (radius, stiff)
    return tables


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
    r_in = np.asarray(pop.be.asnumpy(radius_by_type), dtype=np.float32).reshape(-1)[:256]
    k_in = np.asarray(pop.be.asnumpy(stiffness_by_type), dtype=np.float32).reshape(-1)[:256]
    reach = 2.0 * float(r_in.max()) if r_in.size else 0.0
    if cl.width < reach * (1 - 1e-6):  # pairs farther apart than the width are not all found
        raise ValueError(
            f"cell list width {cl.width} um < 2 x largest crowding radius {reach} um: rebuild it"
        )
    radius, stiff = _crowd_tables(r_in, k_in)
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
    pi = xp.asarray(pairs.i, dtype=np.int32)  # the kernels take int32 rows
    pj = xp.asarray(pairs.j, dtype=np.int32)
    npairs = int(pi.shape[0])
    state = None
    if pop.be.is_gpu and n > 0 and npairs > 0:
        state = _claim_init(pop, n, source_ok, target_ok)
        src_ok, tgt_ok, target_of, taken_by = state[:4]
    else:
        src_ok = (
            xp.ones(n, dtype=np.uint8) if source_ok is None else xp.asarray(source_ok[:n]).astype(np.uint8)
        )
        tgt_ok = (
            xp.ones(n, dtype=np.uint8) if target_ok is None else xp.asarray(target_ok[:n]).astype(np.uint8)
        )
        target_of = xp.full(n, -1, dtype=np.int32)
        taken_by = xp.full(n, -1, dtype=np.int32)
    if n == 0 or npairs == 0:
        return target_of, taken_by
    for r in range(int(rounds)):
        if r == 0 and state is not None:  # made by claim_init
            best, winner = state[4:]
        else:
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


def _claim_init(pop: Population, n: int, source_ok, target_ok):
    """CuPy: (src_ok, tgt_ok, target_of, taken_by, best, winner) of a claim from one launch of
    claim_init (agents.cu); its twin is the fills and casts of claim_targets' NumPy path."""
    xp = pop.xp
    out = (
        xp.empty(n, dtype=np.uint8),
        xp.empty(n, dtype=np.uint8),
        xp.empty(n, dtype=np.int32),
        xp.empty(n, dtype=np.int32),
        xp.empty(n, dtype=np.uint64),
        xp.empty(n, dtype=np.uint64),
    )
    masks = []
    for m in (source_ok, target_ok):  # a mask not given is not read: a spare byte stands in
        if m is None:
            masks += [xp.empty(1, dtype=np.uint8), np.int32(0)]
        else:
            m = xp.asarray(m[:n])
            m = xp.ascontiguousarray(m).view(np.uint8) if m.dtype == np.bool_ else m.astype(np.uint8)
            masks += [m, np.int32(1)]  # read as != 0, as claim_choose reads the twin's casts
    K.launch(pop.be, "claim_init", n, (np.int32(n), *masks, *out))
    return out


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
