"""Skeletal muscle: fibres, endomysium, perimysial septa around fascicles, capillaries, vessels.

Geometry (MODEL.md section 1):

* The pattern is built in the plane transverse to the fibres and extruded along the fibre axis.
  3D: fibres are prisms along x; the transverse plane is (z, y). 2D (nz == 1): the x-y plane *is*
  the transverse section, as in a biopsy stained for histology; the fibre axis is then out of the
  plane. (A longitudinal 2D cut would show every endomysial gap as an isolated band and cannot show
  fascicles, capillary-to-fibre ratio or perifascicular damage, which the disease model needs.)
* Fascicles are Voronoi cells of a jittered lattice whose spacing gives ``fibres_per_fascicle``
  fibres each; the walls between them are perimysium, each side of a septum as thick as half a
  width drawn per fascicle in [perimysium_min_um, perimysium_max_um].
* Fibres are Voronoi cells of a finer jittered lattice, sized so the fibre equivalent diameter
  (wall removed) is ``fibre_diameter_um``; the walls are endomysium (at least one voxel, and
  face-connected). A fibre Voronoi cell cut by a septum: each piece
  and fibres whose seed falls in a septum, become perimysium.
* Capillaries run along the fibres in the endomysium, preferably at fibre corners, with
  capillary-to-fibre ratio ``capillary_to_fibre``. Larger vessels sit in the perimysium, each in a
  cuff of perimysium.
* Disease (antisynthetase myositis): perimysial and perivascular infiltrates; damage of fibres
  falling off with depth from the perimysium (perifascicular pattern).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from tissuesim.grid import Grid
from tissuesim.tissue._geometry import (
    ensure_reachable,
    initial_cells,
    jittered_voronoi,
    paint_ellipsoid,
    rng_for,
    voronoi_walls,
)
from tissuesim.tissue.base import FIELD_NAMES, Compartment, Tissue

ENDOMYSIUM, FIBRE, PERIMYSIUM, CAPILLARY, PERIMYSIAL_VESSEL = range(5)


def muscle_compartments(cfg) -> list[Compartment]:
    """The five muscle compartments, index = label value."""
    fd = {k: float(getattr(cfg.fibre_diffusion, k)) for k in FIELD_NAMES}
    return [
        Compartment("endomysium", open_to_cells=True),
        Compartment("fibre", open_to_cells=False, diffusion=fd),
        Compartment("perimysium", open_to_cells=True),
        Compartment("capillary", open_to_cells=True, vessel=True),
        Compartment("perimysial_vessel", open_to_cells=True, vessel=True),
    ]


def fibre_lattice_spacing(diameter_um: float, endomysium_um: float, dx: float) -> float:
    """Lattice spacing p (um) whose Voronoi cells, less their endomysial wall, have equivalent
    diameter ``diameter_um``.

    A cell of area p^2 has perimeter ~3.8 p (close to a hexagon's 3.72 sqrt(area)); half of it is
    its share of walls of mean width W, so the fibre area is p^2 - 1.9 p W = pi D^2 / 4. W is the
    wall width actually drawn: a one-voxel wall of random orientation measures ~1.15 dx on average
    (calibrated on the labels: measured mean fibre diameters within 3% of the target at dx 5-10 um).
    """
    w = max(endomysium_um, 1.15 * dx)
    return 0.5 * (1.9 * w + math.sqrt((1.9 * w) ** 2 + math.pi * diameter_um**2))


def _plane_shape(grid: Grid) -> tuple[int, int]:
    return (grid.nz, grid.ny) if grid.ndim == 3 else (grid.ny, grid.nx)


def build_muscle(cfg, grid: Grid, seed: int) -> Tissue:
    """Generate muscle on ``grid``; labels per :func:`muscle_compartments`. See the module docstring."""
    dx = grid.dx
    shape = _plane_shape(grid)
    rng = rng_for(seed, 1)

    # --- fascicles and perimysium
    p = fibre_lattice_spacing(cfg.fibre_diameter_um, cfg.endomysium_um, dx)
    sep_mean = 0.5 * (cfg.perimysium_min_um + cfg.perimysium_max_um)
    fas_spacing = math.sqrt(cfg.fibres_per_fascicle) * p + sep_mean
    fcell, fbis, fl1, fseeds = jittered_voronoi(shape, dx, fas_spacing, 0.5, rng)
    half = rng.uniform(cfg.perimysium_min_um, cfg.perimysium_max_um, size=len(fseeds)) / 2.0
    perim = voronoi_walls(fcell, fbis, fl1, half[fcell], dx)

    # --- fibres and endomysium: a Voronoi partition of each fascicle's interior by its own seeds.
    # Seeds in a septum are dropped and no fibre crosses a septum, so fibres at the fascicle edge
    # fill the space up to the perimysium and the mean fibre size is unbiased.
    def seed_fascicle(fib_seeds):
        d2 = ((fib_seeds[:, None, :] - fseeds[None, :, :]) ** 2).sum(-1)
        a = d2.argmin(1)
        sep = np.linalg.norm(fseeds[None, :, :] - fseeds[a][:, None, :], axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            face = np.where(sep > 0, (d2 - d2[np.arange(len(a)), a][:, None]) / (2 * sep), np.inf)
        return np.where(face.min(1) >= half[a], a, -1)

    group = np.where(perim, -2, fcell)
    cell, bis, l1, _ = jittered_voronoi(
        shape, dx, p, cfg.fibre_jitter, rng, seed_group=seed_fascicle, voxel_group=group, reach=2
    )
    endo = voronoi_walls(cell, bis, l1, 0.5 * cfg.endomysium_um, dx) & ~perim
    fibre = ~perim & ~endo & (cell >= 0)
    fid = np.where(fibre, cell, -1)
    area = np.bincount(fid[fibre], minlength=int(fid.max()) + 2)
    # pieces cut to slivers (< 20% of a mean fibre's area, e.g. at the box faces) are endomysium
    sliver = fibre & (area[np.maximum(fid, 0)] * dx * dx < 0.2 * math.pi * cfg.fibre_diameter_um**2 / 4)
    fibre &= ~sliver
    plane = np.full(shape, ENDOMYSIUM, np.uint8)
    plane[perim] = PERIMYSIUM
    plane[fibre] = FIBRE

    p3 = plane[None]  # (1, n0, n1): paint with x -> axis 1, y -> axis 0
    # --- perimysial vessels, each in a cuff of perimysium (they run in widened septa)
    n0, n1 = shape
    area_mm2 = n0 * n1 * dx * dx / 1e6
    n_pv = round(cfg.perimysial_vessels_per_mm2 * area_mm2)
    r_pv = 0.5 * max(cfg.perimysial_vessel_diameter_um, dx)
    cand = np.flatnonzero(plane.ravel() == PERIMYSIUM)
    # prefer the widest septa (fascicle corners): weight by distance from the fibres
    pv_centres = []
    if n_pv > 0 and cand.size:
        dist_fib = ndimage.distance_transform_edt(plane != FIBRE, sampling=dx).ravel()[cand]
        w = (dist_fib + dx) ** 2
        order = rng.choice(cand, size=min(cand.size, 50 * n_pv), replace=False, p=w / w.sum())
        min_sep = 4 * r_pv + 2 * dx
        for v in order:
            c = np.array(np.unravel_index(v, shape), float) * dx + 0.5 * dx
            if all(np.hypot(*(c - q)) >= min_sep for q in pv_centres):
                pv_centres.append(c)
                if len(pv_centres) == n_pv:
                    break
    for c0, c1 in pv_centres:
        paint_ellipsoid(p3, PERIMYSIUM, (c1, c0, 0.0), (r_pv + dx, r_pv + dx, np.inf), dx)
        paint_ellipsoid(p3, PERIMYSIAL_VESSEL, (c1, c0, 0.0), (r_pv, r_pv, np.inf), dx)
    fibre &= plane == FIBRE

    # --- capillaries along the fibres, in the endomysium, fibre corners first
    fib_ids = np.unique(cell[fibre])
    n_fibres = int(fib_ids.size)
    n_cap = round(cfg.capillary_to_fibre * n_fibres)
    ids = np.where(fibre, cell, -1)
    pad = np.pad(ids, 1, constant_values=-1)
    neigh = np.stack(
        [pad[1 + i : 1 + i + n0, 1 + j : 1 + j + n1] for i in (-1, 0, 1) for j in (-1, 0, 1)], -1
    )
    neigh.sort(axis=-1)
    distinct = ((np.diff(neigh, axis=-1) != 0) & (neigh[..., 1:] >= 0)).sum(-1) + (neigh[..., 0] >= 0)
    endo_now = plane == ENDOMYSIUM
    cand = np.flatnonzero((endo_now & (distinct >= 1)).ravel())  # on a fibre surface
    score = distinct.ravel()[cand] + rng.uniform(0, 1, cand.size)  # corners (3+ fibres) first
    cand = cand[np.argsort(-score, kind="stable")]
    r_cap = 0.5 * cfg.capillary_diameter_um
    min_sep = max(2.0 * dx, 0.5 * p / math.sqrt(max(cfg.capillary_to_fibre, 1e-9)))
    blocked = np.zeros(shape, bool)
    rb = math.ceil(min_sep / dx)
    cap_centres = []
    for v in cand:
        if len(cap_centres) >= n_cap:
            break
        i, j = divmod(int(v), n1)
        if blocked[i, j]:
            continue
        cap_centres.append((i, j))
        blocked[max(0, i - rb + 1) : i + rb, max(0, j - rb + 1) : j + rb] = True
    for i, j in cap_centres:
        if r_cap <= 0.75 * dx:
            plane[i, j] = CAPILLARY
        else:
            c = ((j + 0.5) * dx, (i + 0.5) * dx, 0.0)
            paint_ellipsoid(p3, CAPILLARY, c, (r_cap, r_cap, np.inf), dx, where=(p3 == ENDOMYSIUM))

    # --- every open voxel must reach a vessel (the plane decides: extrusion keeps connectivity)
    comps = muscle_compartments(cfg)
    open_lut = np.array([c.is_open for c in comps])
    vessel_lut = np.array([c.vessel for c in comps])
    fixes = ensure_reachable(p3, open_lut, vessel_lut, FIBRE, CAPILLARY, rng)

    # --- to the grid: 3D extrudes the (z, y) plane along x
    labels = (
        np.ascontiguousarray(np.broadcast_to(plane[:, :, None], grid.shape)) if grid.ndim == 3 else p3.copy()
    )

    # --- disease state
    disease = bool(cfg.disease)
    septal = (plane == PERIMYSIUM) | (plane == PERIMYSIAL_VESSEL)
    d_sept = ndimage.distance_transform_edt(~septal, sampling=dx) if septal.any() else np.full(shape, np.inf)
    perifasc = np.exp(-np.maximum(d_sept - dx, 0.0) / cfg.damage_depth_um)
    pv = plane == PERIMYSIAL_VESSEL
    d_pv = ndimage.distance_transform_edt(~pv, sampling=dx) if pv.any() else np.full(shape, np.inf)

    def to_grid(a2):
        a2 = np.asarray(a2)
        return np.broadcast_to(a2[:, :, None], grid.shape) if grid.ndim == 3 else a2[None]

    fields = {}
    if disease:
        dmg = np.where(plane == FIBRE, cfg.damage_peak * perifasc, 0.0).astype(np.float32)
        fields["damage"] = np.ascontiguousarray(to_grid(dmg))
        ab = np.where(open_lut[plane], cfg.autoantibody_interstitial, 0.0).astype(np.float32)
        fields["autoantibody"] = np.ascontiguousarray(to_grid(ab))
    else:
        fields["damage"] = np.zeros(grid.shape, np.float32)

    free2 = (plane == ENDOMYSIUM) | (plane == PERIMYSIUM)
    regions = {
        "niche": to_grid(free2 & (d_pv <= cfg.perivascular_cuff_um)),
        "infiltrate": to_grid(plane == PERIMYSIUM),
        "macrophage": to_grid(free2),
        # inflammatory macrophages: perimysium, and endomysium by perifascicular depth
        "macrophage_weight": to_grid(np.where(plane == PERIMYSIUM, 1.0, perifasc)),
    }
    cells, counts = initial_cells(rng_for(seed, 2), grid, cfg.infiltrate, disease, to_grid(free2), regions)

    meta = {
        "generator": "muscle",
        "seed": int(seed),
        "disease": disease,
        "section_2d": "transverse (fibre axis out of the x-y plane)" if grid.ndim == 2 else None,
        "fibre_axis": "x" if grid.ndim == 3 else "z (out of plane)",
        "fibre_lattice_spacing_um": p,
        "fascicle_lattice_spacing_um": fas_spacing,
        "n_fibres_cross_section": n_fibres,
        "n_capillaries_cross_section": len(cap_centres),
        "n_perimysial_vessels_cross_section": len(pv_centres),
        "reachability_fixes": fixes,
        "initial_cell_counts": counts,
        "density_reference": "whole section",
    }
    return Tissue(grid, labels, comps, initial_cells=cells, initial_fields=fields, meta=meta)
