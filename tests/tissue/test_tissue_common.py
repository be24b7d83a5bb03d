"""Properties every generated tissue must have: reachability, determinism, initial cells."""

from __future__ import annotations

import numpy as np
import pytest

from tissuesim.grid import Grid
from tissuesim.tissue import TISSUE_SCHEMAS, Compartment, Tissue, build_tissue
from tissuesim.tissue._geometry import expected_count
from tissuesim.tissue.measure import unreachable_open_voxels

# small grids keep the folder fast; three seeds per case
GRID_2D = Grid((1, 96, 96), 10.0)
GRID_3D = Grid((24, 48, 64), 10.0)
SEEDS = (0, 1, 2)

GENERATED = ("muscle", "lung", "joint")


def _cfg(name, **kw):
    return TISSUE_SCHEMAS[name](**kw)


def test_unreachable_measure_detects_an_isolated_pocket():
    """The reachability check itself: an open pocket walled off from the vessel is found."""
    lab = np.ones((1, 8, 8), np.uint8)  # closed
    lab[0, 0, :] = 0  # open corridor ...
    lab[0, 0, 0] = 2  # ... with a vessel at its end
    lab[0, 4:6, 4:6] = 0  # pocket of 4 open voxels, no vessel
    t = Tissue(
        Grid((1, 8, 8)), lab, [Compartment("o", True), Compartment("c", False), Compartment("v", True, True)]
    )
    assert unreachable_open_voxels(t) == 4


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("disease", [False, True])
@pytest.mark.parametrize("name", GENERATED)
def test_every_open_voxel_reaches_a_vessel(name, grid, disease):
    for seed in SEEDS:
        t = build_tissue(_cfg(name, disease=disease), grid, seed)
        assert t.vessel_mask().any()
        assert unreachable_open_voxels(t) == 0, (name, seed)


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("name", GENERATED)
def test_same_seed_same_tissue_other_seed_other_tissue(name, grid):
    a = build_tissue(_cfg(name), grid, 5)
    b = build_tissue(_cfg(name), grid, 5)
    c = build_tissue(_cfg(name), grid, 6)
    np.testing.assert_array_equal(a.labels, b.labels)
    for k in a.initial_cells:
        np.testing.assert_array_equal(a.initial_cells[k], b.initial_cells[k])
    for k in a.initial_fields:
        np.testing.assert_array_equal(a.initial_fields[k], b.initial_fields[k])
    assert (a.labels != c.labels).mean() > 0.02


def test_cell_densities_do_not_change_the_geometry():
    g = GRID_2D
    a = build_tissue(_cfg("muscle"), g, 1)
    cfg = _cfg("muscle")
    cfg.infiltrate.b_cell_per_mm2 *= 3
    b = build_tissue(cfg, g, 1)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(b.initial_cells["b_cell"]) > len(a.initial_cells["b_cell"])


def _voxels(t, pos):
    return np.unravel_index(t.grid.voxel_index(pos.astype(np.float32)), t.grid.shape)


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("name", GENERATED)
def test_initial_cells_in_open_voxels_with_configured_counts(name, grid):
    sick = build_tissue(_cfg(name, disease=True), grid, 0)
    well = build_tissue(_cfg(name, disease=False), grid, 0)
    inf = sick_cfg = _cfg(name).infiltrate
    for t in (sick, well):
        free = t.open_mask() & ~t.vessel_mask()
        lo = np.asarray(grid.origin)
        hi = lo + np.asarray(grid.extent_um)
        for ctype, pos in t.initial_cells.items():
            assert pos.dtype == np.float32 and pos.shape[1] == 3
            assert ((pos >= lo) & (pos < hi)).all(), ctype
            assert free[_voxels(t, pos)].all(), (name, ctype)
    # counts follow the section densities (2D: per mm^2 * area; 3D: Abercrombie N_A / (t + D)),
    # over the whole section, or over the synovial membrane of a joint (what a biopsy counts)
    if name == "joint":
        from tissuesim.tissue.joint import LINING

        ref = (sick.labels >= LINING).mean()
        assert 0 < ref < 0.8
    else:
        ref = 1.0
    for ctype, dens in (("b_cell", inf.b_cell_per_mm2), ("plasma_cell", inf.plasma_cell_per_mm2)):
        assert len(sick.initial_cells[ctype]) == round(expected_count(dens, grid, sick_cfg, ref))
    n_mac = round(expected_count(inf.macrophage_per_mm2, grid, inf, ref)) + round(
        expected_count(inf.resident_macrophage_per_mm2, grid, inf, ref)
    )
    assert len(sick.initial_cells["macrophage"]) == n_mac
    # healthy: no B-lineage infiltrate, only resident macrophages, no damage, no autoantibody
    for ctype in ("b_cell", "plasmablast", "plasma_cell"):
        assert len(sick.initial_cells[ctype]) > 0
        assert len(well.initial_cells[ctype]) == 0
    assert len(well.initial_cells["macrophage"]) < len(sick.initial_cells["macrophage"])
    assert (well.initial_fields["damage"] == 0).all()
    assert sick.initial_fields["damage"].max() > 0
    assert "autoantibody" not in well.initial_fields
    ab = sick.initial_fields["autoantibody"]
    assert (ab[~sick.open_mask()] == 0).all() and ab.max() > 0


def test_plasma_cells_sit_in_niches():
    """Plasma cells go to perivascular niches (muscle) and the lymphoid aggregate / artery sheath (lung)."""
    from scipy import ndimage

    from tissuesim.tissue.muscle import PERIMYSIAL_VESSEL

    cfg = _cfg("muscle")
    t = build_tissue(cfg, Grid((1, 128, 128), 10.0), 0)
    d = ndimage.distance_transform_edt(t.labels != PERIMYSIAL_VESSEL, sampling=10.0)
    pc = t.initial_cells["plasma_cell"]
    assert len(pc) > 5
    assert (d[_voxels(t, pc)] <= cfg.perivascular_cuff_um).all()
    b = t.initial_cells["b_cell"]
    share = (d[_voxels(t, b)] <= cfg.perivascular_cuff_um).mean()
    assert share >= cfg.infiltrate.niche_fraction - 0.05


def test_ensure_reachable_closes_crumbs_and_vascularises_pockets():
    from tissuesim.tissue._geometry import ensure_reachable, rng_for

    lab = np.ones((1, 12, 12), np.uint8)  # closed
    lab[0, 0, :] = 0
    lab[0, 0, 0] = 2  # corridor with a vessel
    lab[0, 3, 3] = 0  # 1-voxel crumb: closed
    lab[0, 6:10, 6:10] = 0  # 16-voxel pocket: gets a vessel voxel
    comps = [Compartment("o", True), Compartment("c", False), Compartment("v", True, True)]
    open_lut = np.array([c.is_open for c in comps])
    vessel_lut = np.array([c.vessel for c in comps])
    assert unreachable_open_voxels(Tissue(Grid((1, 12, 12)), lab.copy(), comps)) == 17
    fixes = ensure_reachable(lab, open_lut, vessel_lut, 1, 2, rng_for(0, 0))
    assert fixes == {"closed_crumbs": 1, "added_vessels": 1}
    assert lab[0, 3, 3] == 1 and (lab[0, 6:10, 6:10] == 2).sum() == 1
    assert unreachable_open_voxels(Tissue(Grid((1, 12, 12)), lab, comps)) == 0
