"""Synovial joint: layers along y, bone | cartilage | synovial fluid | synovial lining | sublining.

Geometry (MODEL.md section 1):

* y = 0 is the bone side. Layer thicknesses are taken from the config from the synovium outward:
  the lining (``lining_um``; ``lining_ra_um`` with disease: 10-15 cell layers in rheumatoid
  arthritis) and the fluid keep their thickness, the sublining at least ``sublining_min_um``,
  bone ``bone_um``; cartilage (2-3 mm in life) gets what is left of the grid up to
  ``cartilage_um``, and any spare extent goes to the sublining. When even that does not fit,
  fluid, sublining and bone shrink in proportion (at least one voxel each). The thicknesses
  used are in meta.
* The fluid|lining and lining|sublining surfaces undulate together (villi), by a smooth random
  height field of amplitude ``villus_amplitude_um`` and lateral scale ``villus_wavelength_um``,
  so the lining keeps its thickness in every column.
* Sublining vessels run along z (disks in a 2D x-y section, tubes in 3D); with disease, lymphoid
  aggregates (disks / spheres) sit beside vessels in the sublining.
* Cartilage and bone are closed to cells; cartilage slows every field (dense matrix).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from tissuesim.grid import Grid
from tissuesim.tissue._geometry import ensure_reachable, initial_cells, paint_ellipsoid, rng_for, smooth_noise
from tissuesim.tissue.base import FIELD_NAMES, Compartment, Tissue

BONE, CARTILAGE, FLUID, LINING, SUBLINING, VESSEL, LYMPHOID = range(7)
LAYER_ORDER = (BONE, CARTILAGE, FLUID, LINING, SUBLINING)


def joint_compartments(cfg) -> list[Compartment]:
    """The seven joint compartments, index = label value."""
    cart = {k: float(getattr(cfg.cartilage_diffusion, k)) for k in FIELD_NAMES}
    bone = {k: float(getattr(cfg.bone_diffusion, k)) for k in FIELD_NAMES}
    return [
        Compartment("bone", open_to_cells=False, diffusion=bone),
        Compartment("cartilage", open_to_cells=False, diffusion=cart),
        Compartment("synovial_fluid", open_to_cells=True),
        Compartment("synovial_lining", open_to_cells=True),
        Compartment("sublining", open_to_cells=True),
        Compartment("sublining_vessel", open_to_cells=True, vessel=True),
        Compartment("lymphoid_aggregate", open_to_cells=True, niche=True),
    ]


def layer_thicknesses(cfg, extent_um: float, dx: float) -> dict[str, float]:
    """Thickness in um of each layer along y, summing to ``extent_um`` (see module docstring)."""
    lining = cfg.lining_ra_um if cfg.disease else cfg.lining_um
    lining = max(lining, dx)
    fluid, sub, bone = max(cfg.fluid_um, dx), max(cfg.sublining_min_um, dx), max(cfg.bone_um, dx)
    left = extent_um - lining - fluid - sub - bone
    if left >= dx:
        cart = min(cfg.cartilage_um, left)
        sub += left - cart
    else:  # too small a grid: keep the lining, one voxel of cartilage, shrink the rest in proportion
        cart = dx
        rest = extent_um - lining - cart
        if rest < 3 * dx:
            raise ValueError(
                f"grid.ny={round(extent_um / dx)}: too few voxels along y for the joint layers "
                f"(lining {lining:g} um + 4 more layers of at least dx={dx:g} um)"
            )
        f = rest / (fluid + sub + bone)
        fluid, sub, bone = (max(dx, v * f) for v in (fluid, sub, bone))
        sub = extent_um - lining - cart - fluid - bone
    return {
        "bone": bone,
        "cartilage": cart,
        "synovial_fluid": fluid,
        "synovial_lining": lining,
        "sublining": sub,
    }


def build_joint(cfg, grid: Grid, seed: int) -> Tissue:
    """Generate a joint on ``grid``; labels per :func:`joint_compartments`. See the module docstring."""
    dx = grid.dx
    nz, ny, nx = grid.shape
    rng = rng_for(seed, 1)
    disease = bool(cfg.disease)
    th = layer_thicknesses(cfg, ny * dx, dx)

    # boundaries along y (um from the grid corner); the synovial surfaces undulate over (z, x)
    y_cart = th["bone"]
    y_fluid = y_cart + th["cartilage"]
    y_lin = y_fluid + th["synovial_fluid"]
    sigma = cfg.villus_wavelength_um / (2 * math.pi) / dx
    h = cfg.villus_amplitude_um * smooth_noise((nz, nx), (sigma if nz > 1 else 0.0, sigma), rng)
    # keep at least one voxel of fluid and of sublining
    h = np.clip(h, -(th["synovial_fluid"] - dx), th["sublining"] - dx)
    b_lin = y_lin + h  # (nz, nx)
    b_sub = b_lin + th["synovial_lining"]
    y = (np.arange(ny) + 0.5) * dx
    yy = y[None, :, None]
    labels = np.full(grid.shape, SUBLINING, np.uint8)
    labels[yy < b_sub[:, None, :]] = LINING
    labels[np.broadcast_to(yy < b_lin[:, None, :], grid.shape)] = FLUID
    labels[:, y < y_fluid, :] = CARTILAGE
    labels[:, y < y_cart, :] = BONE

    # --- sublining vessels: tubes along z, count from the section density over the sublining area
    sub2 = labels[nz // 2] == SUBLINING  # (ny, nx) section
    sub_area_mm2 = sub2.sum() * dx * dx / 1e6
    n_v = round(cfg.sublining_vessels_per_mm2 * sub_area_mm2)
    r_v = 0.5 * max(cfg.vessel_diameter_um, dx)
    cand = np.flatnonzero(sub2.ravel())
    vessels = []
    if cand.size and n_v:
        min_sep = 2 * r_v + 2 * dx
        for v in rng.permutation(cand)[: 40 * n_v]:
            c = (np.array(np.unravel_index(v, sub2.shape), float) + 0.5) * dx  # (y, x)
            if all(np.hypot(*(c - q)) >= min_sep for q in vessels):
                vessels.append(c)
                if len(vessels) == n_v:
                    break
    is_sub = labels == SUBLINING
    for cy, cx in vessels:
        paint_ellipsoid(labels, VESSEL, (cx, cy, 0.0), (r_v, r_v, np.inf), dx, where=is_sub)

    # --- lymphoid aggregates (disease): beside a vessel, inside the sublining
    aggregates = []
    if disease and vessels:
        r_a = 0.5 * cfg.lymphoid_aggregate_diameter_um
        if grid.ndim == 2:
            n_a = cfg.lymphoid_aggregates_per_mm2 * sub_area_mm2
        else:  # section density -> volume density: N_V = N_A / D (aggregates >> section thickness)
            vol_mm3 = (labels == SUBLINING).sum() * dx**3 / 1e9
            n_a = cfg.lymphoid_aggregates_per_mm2 / (2 * r_a / 1000) * vol_mm3
        n_a = round(n_a)
        is_sub = labels == SUBLINING
        for k in rng.permutation(len(vessels))[:n_a]:
            cy, cx = vessels[k]
            ang = rng.uniform(0, 2 * math.pi)
            cy, cx = cy + (r_a + r_v) * math.sin(ang), cx + (r_a + r_v) * math.cos(ang)
            cz = rng.uniform(0, nz * dx) if nz > 1 else 0.0
            paint_ellipsoid(
                labels, LYMPHOID, (cx, cy, cz), (r_a, r_a, r_a if nz > 1 else np.inf), dx, where=is_sub
            )
            aggregates.append((cx, cy, cz))

    comps = joint_compartments(cfg)
    open_lut = np.array([c.is_open for c in comps])
    vessel_lut = np.array([c.vessel for c in comps])
    fixes = ensure_reachable(labels, open_lut, vessel_lut, CARTILAGE, VESSEL, rng)

    # --- disease state
    fields = {"damage": np.zeros(grid.shape, np.float32)}
    is_open = open_lut[labels]
    if disease:
        depth = np.clip(y_fluid - y, 0.0, None)  # um below the cartilage surface
        prof = (cfg.damage_peak * np.exp(-(depth - 0.5 * dx) / cfg.damage_depth_um)).astype(np.float32)
        fields["damage"] = np.where(labels == CARTILAGE, prof[None, :, None], 0.0).astype(np.float32)
        fields["autoantibody"] = np.where(is_open, cfg.autoantibody_interstitial, 0.0).astype(np.float32)

    free = is_open & ~vessel_lut[labels]
    ves = vessel_lut[labels]
    near_v = (
        ndimage.distance_transform_edt(~ves, sampling=dx) <= cfg.perivascular_cuff_um
        if ves.any()
        else np.zeros_like(ves)
    )
    regions = {
        "niche": (labels == LYMPHOID) | (near_v & (labels == SUBLINING)),
        "infiltrate": (labels == SUBLINING) | (labels == LYMPHOID),
        "macrophage": (labels == LINING) | (labels == SUBLINING),  # lining macrophages (type A synoviocytes)
        # densities count over the synovial membrane, as in a synovial biopsy (not over cartilage)
        "reference": (labels >= LINING),
    }
    cells, counts = initial_cells(rng_for(seed, 2), grid, cfg.infiltrate, disease, free, regions)
    meta = {
        "generator": "joint",
        "seed": int(seed),
        "disease": disease,
        "layer_axis": "y",
        "layer_order": [comps[i].name for i in LAYER_ORDER],
        "layer_thickness_um": th,
        "n_vessels_section": len(vessels),
        "n_lymphoid_aggregates": len(aggregates),
        "reachability_fixes": fixes,
        "initial_cell_counts": counts,
        "density_reference": "synovial membrane (lining, sublining, vessels, aggregates)",
    }
    return Tissue(grid, labels, comps, initial_cells=cells, initial_fields=fields, meta=meta)
