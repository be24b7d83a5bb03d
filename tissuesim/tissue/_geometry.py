"""Vectorised geometry helpers shared by the generators (NumPy + scipy.ndimage, host side).

Tissue geometry is built once per run on the host, so these are NumPy only; they avoid per-voxel
Python loops (loops run over lattice offsets, objects or chunks of slabs).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import ndimage

from tissuesim.grid import Grid


def rng_for(seed: int, purpose: int) -> np.random.Generator:
    """Independent stream per (seed, purpose): geometry and cell placement never share draws,
    so changing a cell density leaves the labels of the same seed unchanged."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(purpose)]))


def jittered_voronoi(
    shape: tuple[int, ...],
    dx: float,
    spacing: float,
    jitter: float,
    rng: np.random.Generator,
    chunk: int = 0,
    seed_group=None,
    voxel_group: np.ndarray | None = None,
    reach: int = 1,
):
    """Voronoi partition of a box from seeds on a jittered square/cubic lattice.

    shape : array shape (2 or 3 axes) of the box, voxel edge ``dx`` um.
    spacing : lattice spacing in um (one seed per lattice cell; mean cell volume spacing^ndim).
    jitter : seed displacement as a fraction of the spacing (uniform in [-jitter/2, jitter/2]).
    Seeds cover one extra lattice cell beyond each face so cells at the box faces are not cut short.

    Returns (cell, bisector_um, l1_normal, seeds):
      cell : int32 array ``shape``, index of the nearest seed;
      bisector_um : float32 ``shape``, distance of the voxel centre to the nearest face of its
        Voronoi cell (the nearest bisector with any other seed), um;
      l1_normal : float32 ``shape``, |n|_1 of that face's unit normal (1 for axis-aligned faces, up to
        sqrt(ndim)): a digital wall is face-connected only if it is at least |n|_1 * dx thick;
      seeds : float64 (n_seeds, ndim) seed positions in um (array axis order, from the box corner).
    Seeds are searched among the (2 reach + 1)^ndim lattice cells around the voxel's cell, exact
    for jitter <= 0.5 and a close approximation above (see :func:`voronoi_walls`).

    Grouped partition (fibres inside fascicles): ``seed_group(seeds) -> int (n_seeds,)`` and
    ``voxel_group`` (int, ``shape``) restrict each voxel to seeds of its own group; a seed of group
    -1 is dropped. Voxels with no seed of their group in reach get cell -1 and bisector 0.
    """
    d = len(shape)
    ncell = np.array([math.ceil(n * dx / spacing) + 2 * reach for n in shape])
    u = rng.uniform(-0.5, 0.5, size=(*ncell, d))
    idx = np.moveaxis(np.indices(ncell), 0, -1)
    seeds = ((idx - reach + 0.5 + jitter * u) * spacing).reshape(-1, d)
    grouped = seed_group is not None
    sgroup = np.asarray(seed_group(seeds)) if grouped else None
    strides = [int(np.prod(ncell[k + 1 :])) for k in range(d)]
    # float32 coordinates: um-scale positions over a few mm keep ~0.1 um precision, and half the
    # memory traffic of the gathers that dominate the cost
    sk = [np.ascontiguousarray(seeds[:, k], dtype=np.float32) for k in range(d)]

    cell = np.empty(shape, np.int32)
    bis = np.empty(shape, np.float32)
    l1n = np.empty(shape, np.float32)
    plane = int(np.prod(shape[1:]))
    chunk = chunk or max(1, (1 << 20) // max(plane, 1))
    for a0 in range(0, shape[0], chunk):
        a1 = min(shape[0], a0 + chunk)
        ranges = [np.arange(a0, a1), *[np.arange(n) for n in shape[1:]]]
        coords = np.meshgrid(
            *[((r + 0.5) * dx).astype(np.float32) for r in ranges], indexing="ij", sparse=True
        )
        base = [(np.floor(c / spacing).astype(np.int64) + reach).astype(np.intp) for c in coords]
        vg = voxel_group[a0:a1] if grouped else None
        sub = (a1 - a0, *shape[1:])
        offsets = list(itertools.product(range(-reach, reach + 1), repeat=d))

        def cand(off, base=base, sub=sub, coords=coords, vg=vg):
            flat = np.broadcast_to(sum((base[k] + off[k]) * strides[k] for k in range(d)), sub)
            sj = [sk[k][flat] for k in range(d)]
            d2 = sum((coords[k] - sj[k]) ** 2 for k in range(d))
            if grouped:
                d2 = np.where(sgroup[flat] == vg, d2, np.float32(np.inf))
            return flat, sj, d2

        # pass 1: nearest seed
        b1 = np.full(sub, np.inf, np.float32)
        i1 = np.full(sub, -1, np.intp)
        for off in offsets:
            flat, _, d2 = cand(off)
            closer = d2 < b1
            b1 = np.where(closer, d2, b1)
            i1 = np.where(closer, flat, i1)
        # pass 2: distance to the nearest Voronoi face, min over the other seeds j of
        # (|p - s_j|^2 - |p - s_1|^2) / (2 |s_j - s_1|) (the second-nearest seed's face is not always
        # the nearest face; using it would leave air pockets inside thick walls)
        s1 = [sk[k][i1] for k in range(d)]
        best = np.full(sub, np.inf, np.float32)
        l1b = np.ones(sub, np.float32)
        for off in offsets:
            flat, sj, d2 = cand(off)
            diff = [sj[k] - s1[k] for k in range(d)]
            sep = np.sqrt(sum(c * c for c in diff))
            with np.errstate(divide="ignore", invalid="ignore"):
                h = np.where((flat == i1) | ~np.isfinite(d2), np.inf, (d2 - b1) / (2.0 * sep))
                l1 = sum(np.abs(c) for c in diff) / sep
            better = h < best
            best = np.where(better, h, best)
            l1b = np.where(better, l1, l1b)
        cell[a0:a1] = i1
        bis[a0:a1] = np.where(i1 < 0, 0.0, best)
        l1n[a0:a1] = l1b
    return cell, bis, l1n, seeds


def voronoi_walls(
    cell: np.ndarray, bisector_um: np.ndarray, l1_normal: np.ndarray, half_um, dx: float
) -> np.ndarray:
    """bool mask of the walls between Voronoi cells.

    A voxel is wall when its centre lies within ``half_um`` (scalar or array per voxel) of the
    nearest face of its Voronoi cell. The half-width is raised to |n|_1 dx / 2 so every wall is at least
    face-connected (no diagonal leaks between neighbouring cells, no gaps in the wall network).
    Where the approximate nearest-seed search leaves two face-adjacent voxels of different cells
    both outside the wall, the lower-index voxel is added, so cells never touch across a face.
    """
    wall = bisector_um < np.maximum(half_um, 0.5 * l1_normal * dx)
    for ax in range(cell.ndim):
        a = [slice(None)] * cell.ndim
        b = [slice(None)] * cell.ndim
        a[ax] = slice(0, -1)
        b[ax] = slice(1, None)
        a, b = tuple(a), tuple(b)
        touch = (cell[a] != cell[b]) & ~wall[a] & ~wall[b]
        wall[a] |= touch
    return wall


def smooth_noise(shape: tuple[int, ...], sigma_vox, rng: np.random.Generator) -> np.ndarray:
    """float32 Gaussian random field of zero mean and unit standard deviation with correlation length sigma_vox voxels."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap")
    f -= f.mean()  # a correlation length near the box size leaves a large common offset
    s = f.std()
    return (f / s if s > 0 else f).astype(np.float32)


def paint_ellipsoid(arr: np.ndarray, value, centre, semi, dx: float, where: np.ndarray | None = None) -> None:
    """Set ``arr`` (nz, ny, nx) to ``value`` inside an axis-aligned ellipsoid, in place.

    centre : (x, y, z) um from the grid corner; semi : (ax, ay, az) semi-axes in um (np.inf: a
    cylinder along that axis). ``where`` (bool, same shape) limits which voxels may change.
    Works on the bounding box only, so painting many small objects stays cheap.
    """
    nz, ny, nx = arr.shape
    sl, grids = [], []
    for c, a, n in zip((centre[2], centre[1], centre[0]), (semi[2], semi[1], semi[0]), (nz, ny, nx)):
        if np.isinf(a) or n == 1:
            lo, hi = 0, n
        else:
            lo, hi = max(0, math.floor((c - a) / dx)), min(n, math.ceil((c + a) / dx) + 1)
        if hi <= lo:
            return
        sl.append(slice(lo, hi))
        x = (np.arange(lo, hi) + 0.5) * dx
        grids.append(np.zeros_like(x) if (np.isinf(a) or n == 1) else ((x - c) / a) ** 2)
    r2 = grids[0][:, None, None] + grids[1][None, :, None] + grids[2][None, None, :]
    inside = r2 <= 1.0
    if where is not None:
        inside &= where[tuple(sl)]
    arr[tuple(sl)][inside] = value


def face_structure(ndim: int = 3) -> np.ndarray:
    """Face connectivity (6 neighbours in 3D, 4 in a (1, ny, nx) 2D grid)."""
    return ndimage.generate_binary_structure(ndim, 1)


def ensure_reachable(
    labels: np.ndarray,
    open_lut: np.ndarray,
    vessel_lut: np.ndarray,
    close_label: int,
    vessel_label: int,
    rng: np.random.Generator,
    min_keep: int = 4,
) -> dict:
    """Make every open voxel reach a vessel through open voxels (face connectivity), in place.

    Open components without a vessel voxel are either closed (fewer than ``min_keep`` voxels:
    discretisation crumbs, relabelled ``close_label``) or given one vessel voxel (a capillary
    the generator's placement missed). Returns counts for the tissue's meta.
    """
    is_open = open_lut[labels]
    comp, n = ndimage.label(is_open, structure=face_structure(3))
    if n == 0:
        return {"closed_crumbs": 0, "added_vessels": 0}
    has_vessel = np.bincount(comp[vessel_lut[labels]], minlength=n + 1) > 0
    has_vessel[0] = True
    size = np.bincount(comp.ravel(), minlength=n + 1)
    bad = np.flatnonzero(~has_vessel)
    small = bad[size[bad] < min_keep]
    big = bad[size[bad] >= min_keep]
    if small.size:
        labels[np.isin(comp, small)] = close_label
    if big.size:
        flat = comp.ravel()
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], big)
        pick = order[starts + rng.integers(0, size[big])]
        labels.reshape(-1)[pick] = vessel_label
    return {"closed_crumbs": int(small.size), "added_vessels": int(big.size)}


# -------------------------------------------------------------------------------------------------
# initial cells


def expected_count(per_mm2: float, grid: Grid, inf, reference_fraction: float = 1.0) -> float:
    """Cells in the grid for a section density per mm^2 (see InfiltrateConfig).

    2D: the grid is the section, count = N_A * area. 3D: N_V = N_A / (t + D) (Abercrombie 1946),
    count = N_V * volume. ``reference_fraction`` is the share of the grid the density refers to
    (e.g. the synovial membrane of a joint, which is what a synovial biopsy counts over).
    """
    lx, ly, lz = grid.extent_um
    if grid.ndim == 2:
        return per_mm2 * lx * ly / 1e6 * reference_fraction
    per_um3 = per_mm2 / 1e6 / (inf.section_thickness_um + inf.cell_diameter_um)
    return per_um3 * lx * ly * lz * reference_fraction


def place_in(rng: np.random.Generator, grid: Grid, weight: np.ndarray, n: int) -> np.ndarray:
    """float32 (n, 3) positions (x, y, z) um drawn in voxels with probability ~ weight (nz, ny, nx).

    Voxels are drawn without replacement while there are enough of them (one cell per 10 um voxel
    at most, as cells are 7-10 um); positions are uniform inside the central 90% of the voxel so
    float32 rounding can never move a cell into a neighbouring (possibly closed) voxel. In 2D z is
    the slab centre.
    """
    w = np.asarray(weight, dtype=np.float64).ravel()
    cand = np.flatnonzero(w > 0)
    if n <= 0 or cand.size == 0:
        return np.zeros((0, 3), np.float32)
    p = w[cand] / w[cand].sum()
    pick = rng.choice(cand, size=n, replace=n > cand.size, p=p)
    k, j, i = np.unravel_index(pick, grid.shape)
    frac = rng.uniform(0.05, 0.95, size=(n, 3))
    if grid.ndim == 2:
        frac[:, 2] = 0.5
    ijk = np.stack([i, j, k], axis=1) + frac
    pos = np.asarray(grid.origin) + ijk * grid.dx
    return pos.astype(np.float32)


def initial_cells(rng, grid: Grid, inf, disease: bool, free: np.ndarray, regions: dict) -> tuple[dict, dict]:
    """Place the disease infiltrate and resident macrophages.

    free : bool (nz, ny, nx) open, non-vessel voxels (cells are never seeded inside vessels).
    regions : bool masks (combined with ``free``): ``niche`` (perivascular / lymphoid aggregate),
      ``infiltrate`` (where B cells outside niches sit), ``macrophage`` (inflammatory macrophages),
      float ``macrophage_weight`` optional (multiplies the macrophage mask, e.g. by damage),
      bool ``reference`` optional: the tissue the densities are counted over (default: whole grid).
    B cells and plasmablasts: a share ``niche_fraction`` in niches, the rest in ``infiltrate``;
    plasma cells: niches only (MODEL.md: sessile in niches); macrophages: resident ones anywhere
    free, inflammatory ones in ``macrophage``. With disease False only resident macrophages.
    Returns (cells: type -> float32 (n, 3), counts: type -> int).
    """
    niche = regions["niche"] & free
    infl = regions["infiltrate"] & free
    mac = regions["macrophage"] & free
    if not niche.any():
        niche = infl if infl.any() else free
    if not infl.any():
        infl = free
    if not mac.any():
        mac = free
    macw = mac * regions.get("macrophage_weight", 1.0)

    ref = regions.get("reference")
    ref_frac = 1.0 if ref is None else float(np.count_nonzero(ref)) / ref.size

    def n_of(per_mm2):
        return round(expected_count(per_mm2, grid, inf, ref_frac)) if disease else 0

    cells = {}
    nb, npb = n_of(inf.b_cell_per_mm2), n_of(inf.plasmablast_per_mm2)
    for name, n in (("b_cell", nb), ("plasmablast", npb)):
        n_niche = round(n * inf.niche_fraction)
        cells[name] = np.concatenate(
            [place_in(rng, grid, niche, n_niche), place_in(rng, grid, infl, n - n_niche)]
        )
    cells["plasma_cell"] = place_in(rng, grid, niche, n_of(inf.plasma_cell_per_mm2))
    n_res = round(expected_count(inf.resident_macrophage_per_mm2, grid, inf, ref_frac))
    cells["macrophage"] = np.concatenate(
        [place_in(rng, grid, free, n_res), place_in(rng, grid, macw, n_of(inf.macrophage_per_mm2))]
    )
    return cells, {k: len(v) for k, v in cells.items()}
