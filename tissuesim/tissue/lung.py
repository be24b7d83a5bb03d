"""Lung parenchyma: alveolar air spaces, septa with capillaries, one bronchovascular bundle.

Geometry (MODEL.md section 1):

* Alveoli are Voronoi cells of a jittered lattice over the whole grid (3D cells in 3D, polygons in
  a 2D section), sized so each air space has equivalent diameter ``alveolar_diameter_um``
  (sphere in 3D, circle in 2D). Air is closed to cells and to every field (multiplier 0).
* Septa are the Voronoi walls, ``septum_um`` thick (healthy 5-10 um, drawn at least one voxel
  and face-connected) or ``septum_ild_um`` with disease (interstitial lung disease, 20-50 um).
* Septal capillaries: patches of the septal mid-plane (a smooth random field thresholded to the
  fraction ``capillary_fraction``), so septa carry capillary segments everywhere.
* A bronchovascular bundle runs along x in 3D (a cross-section in 2D): airway lumen (air,
  closed) in a wall, a pulmonary artery beside it, both wrapped in bronchovascular interstitium,
  and with disease a lymphoid aggregate (iBALT) in the sheath, an ellipsoid along the bundle.
  The bundle is scaled down (factor in meta) when it would not fit in 60% of the cross-section.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from tissuesim.grid import Grid
from tissuesim.tissue._geometry import (
    ensure_reachable,
    face_structure,
    initial_cells,
    jittered_voronoi,
    paint_ellipsoid,
    rng_for,
    smooth_noise,
    voronoi_walls,
)
from tissuesim.tissue.base import FIELD_NAMES, Compartment, Tissue

AIR, SEPTUM, CAPILLARY, AIRWAY_LUMEN, BV_INTERSTITIUM, ARTERY, LYMPHOID = range(7)


def lung_compartments(cfg=None) -> list[Compartment]:
    """The seven lung compartments, index = label value."""
    closed = dict.fromkeys(FIELD_NAMES, 0.0)
    return [
        Compartment("alveolar_air", open_to_cells=False, diffusion=closed, default_diffusion=0.0),
        Compartment("septum", open_to_cells=True),
        Compartment("capillary", open_to_cells=True, vessel=True),
        Compartment("airway_lumen", open_to_cells=False, diffusion=closed, default_diffusion=0.0),
        Compartment("bronchovascular_interstitium", open_to_cells=True),
        Compartment("artery", open_to_cells=True, vessel=True),
        Compartment("lymphoid_aggregate", open_to_cells=True, niche=True),
    ]


def alveolar_lattice_spacing(diameter_um: float, wall_um: float, ndim: int) -> float:
    """Lattice spacing a (um) whose Voronoi cells, less their share of walls W, have equivalent
    diameter ``diameter_um``. 3D: a^3 - 2.65 a^2 W = pi D^3 / 6 (cell surface ~5.3 a^2, half of
    each wall per cell); 2D: a^2 - 1.9 a W = pi D^2 / 4. Solved by bisection."""
    target = math.pi * diameter_um**3 / 6 if ndim == 3 else math.pi * diameter_um**2 / 4
    k = 2.65 if ndim == 3 else 1.9

    def air(a):
        return a**ndim - k * a ** (ndim - 1) * wall_um

    lo, hi = k * wall_um, 10 * diameter_um + 10 * wall_um
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if air(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def build_lung(cfg, grid: Grid, seed: int) -> Tissue:
    """Generate lung on ``grid``; labels per :func:`lung_compartments`. See the module docstring."""
    dx = grid.dx
    rng = rng_for(seed, 1)
    disease = bool(cfg.disease)
    septum_um = cfg.septum_ild_um if disease else cfg.septum_um
    shape = grid.shape if grid.ndim == 3 else grid.shape[1:]

    # --- alveoli and septa; mean drawn wall width is at least the mean |n|_1 dx
    w_mean = max(septum_um, (1.5 if grid.ndim == 3 else 4 / math.pi) * dx)
    a = alveolar_lattice_spacing(cfg.alveolar_diameter_um, w_mean, grid.ndim)
    cell, bis, l1, _ = jittered_voronoi(shape, dx, a, cfg.alveolar_jitter, rng)
    walls = voronoi_walls(cell, bis, l1, 0.5 * septum_um, dx)
    mid = walls & (bis < 0.5 * l1 * dx)  # thinnest face-connected wall: the septal mid-plane
    del cell
    labels = np.where(walls, SEPTUM, AIR).astype(np.uint8)
    # air crumbs (< 5% of an alveolus: corners of cells mostly outside the box, slivers at wall
    # junctions) become septal tissue
    comp, _ = ndimage.label(~walls, structure=face_structure(grid.ndim))
    size = np.bincount(comp.ravel())
    alv_vox = (
        math.pi / 6 * cfg.alveolar_diameter_um**3
        if grid.ndim == 3
        else math.pi / 4 * cfg.alveolar_diameter_um**2
    ) / dx**grid.ndim
    crumb = size < 0.05 * alv_vox
    crumb[0] = False
    labels[crumb[comp]] = SEPTUM
    del comp
    if mid.any() and cfg.capillary_fraction > 0:
        noise = smooth_noise(shape, max(cfg.capillary_patch_um / dx / 2, 0.5), rng)
        thr = np.quantile(noise[mid], 1.0 - cfg.capillary_fraction)
        labels[mid & (noise >= thr)] = CAPILLARY
    del bis, l1, mid
    if grid.ndim == 2:
        labels = labels[None]

    # --- bronchovascular bundle (cylinders along x in 3D; disks in the 2D x-y section)
    bundle = {}
    if cfg.bundle:
        pshape = (grid.nz, grid.ny) if grid.ndim == 3 else (grid.ny, grid.nx)
        ext = min(pshape) * dx
        r_aw, wall, r_ar = cfg.airway_diameter_um / 2, cfg.airway_wall_um, cfg.artery_diameter_um / 2
        sheath, r_la = cfg.sheath_um, cfg.lymphoid_aggregate_diameter_um / 2
        span = 2 * (r_aw + wall + sheath) + 2 * r_ar + sheath
        scale = min(1.0, 0.6 * ext / span)
        r_aw, wall, r_ar, sheath, r_la = (v * scale for v in (r_aw, wall, r_ar, sheath, r_la))
        c = np.array(pshape, float) * dx * (0.5 + rng.uniform(-0.1, 0.1, 2))
        th = rng.uniform(0, 2 * math.pi)
        u = np.array([math.cos(th), math.sin(th)])
        v = np.array([-u[1], u[0]])
        c_aw = c - u * (r_ar + 0.5 * sheath)
        c_ar = c_aw + u * (r_aw + wall + sheath + r_ar)
        c_la = c_aw + v * (r_aw + wall + r_la)
        x_la = rng.uniform(0.25, 0.75) * grid.nx * dx
        lx_la = 1.5 * r_la  # aggregates are ovoid along the bundle (modelling choice)

        def paint(value, cp, r, rx=np.inf, where=None):
            if grid.ndim == 3:  # plane axes (z, y): cp = (z, y)
                paint_ellipsoid(
                    labels, value, (x_la if np.isfinite(rx) else 0.0, cp[1], cp[0]), (rx, r, r), dx, where
                )
            else:  # plane axes (y, x)
                paint_ellipsoid(labels, value, (cp[1], cp[0], 0.0), (r, r, np.inf), dx, where)

        paint(BV_INTERSTITIUM, c_aw, r_aw + wall + sheath)
        paint(BV_INTERSTITIUM, c_ar, r_ar + sheath)
        if disease:
            paint(BV_INTERSTITIUM, c_la, r_la + 0.5 * sheath, lx_la + 0.5 * sheath)
        paint(AIRWAY_LUMEN, c_aw, r_aw)
        paint(ARTERY, c_ar, r_ar)
        if disease:
            paint(LYMPHOID, c_la, r_la, lx_la, where=labels == BV_INTERSTITIUM)
        bundle = {"scale": scale, "airway_centre_um": c_aw.tolist(), "artery_centre_um": c_ar.tolist()}

    comps = lung_compartments(cfg)
    open_lut = np.array([c.is_open for c in comps])
    vessel_lut = np.array([c.vessel for c in comps])
    fixes = ensure_reachable(labels, open_lut, vessel_lut, AIR, CAPILLARY, rng)

    # --- disease state
    is_open = open_lut[labels]
    fields = {"damage": np.zeros(grid.shape, np.float32)}
    if disease:
        # patchy septal injury (ILD is heterogeneous): smooth field over a few alveoli
        patch = smooth_noise(
            grid.shape if grid.ndim == 3 else grid.shape[1:], cfg.alveolar_diameter_um / dx, rng
        )
        patch = np.clip(0.5 + 0.35 * patch, 0.0, 1.0).reshape(grid.shape)
        fields["damage"] = np.where(labels == SEPTUM, cfg.damage_peak * patch, 0.0).astype(np.float32)
        fields["autoantibody"] = np.where(is_open, cfg.autoantibody_interstitial, 0.0).astype(np.float32)

    free = is_open & ~vessel_lut[labels]
    art = labels == ARTERY
    near_art = (
        ndimage.distance_transform_edt(~art, sampling=dx) <= max(cfg.sheath_um, dx)
        if art.any()
        else np.zeros_like(art)
    )
    interstitium = (labels == BV_INTERSTITIUM) | (labels == LYMPHOID)
    regions = {
        "niche": (labels == LYMPHOID) | (near_art & interstitium),
        "infiltrate": interstitium | (labels == SEPTUM),
        "macrophage": free,
    }
    cells, counts = initial_cells(rng_for(seed, 2), grid, cfg.infiltrate, disease, free, regions)
    meta = {
        "generator": "lung",
        "seed": int(seed),
        "disease": disease,
        "septum_um": septum_um,
        "alveolar_lattice_spacing_um": a,
        "bundle": bundle,
        "reachability_fixes": fixes,
        "initial_cell_counts": counts,
        "density_reference": "whole section",
    }
    return Tissue(grid, labels, comps, initial_cells=cells, initial_fields=fields, meta=meta)
