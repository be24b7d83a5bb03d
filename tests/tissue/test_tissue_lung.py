"""Lung geometry measured from the labels (Weibel; Ochs 2004; MODEL.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tissuesim.grid import Grid
from tissuesim.tissue import LungConfig, build_tissue
from tissuesim.tissue.lung import AIR, AIRWAY_LUMEN, ARTERY, CAPILLARY, LYMPHOID, SEPTUM
from tissuesim.tissue.measure import equivalent_diameters, wall_thickness

GRIDS = [Grid((1, 128, 128), 10.0), Grid((48, 48, 48), 10.0)]


def _parenchyma(t):
    """Air and septal tissue, without the bronchovascular bundle."""
    return t.labels == AIR, (t.labels == SEPTUM) | (t.labels == CAPILLARY)


@pytest.mark.parametrize("grid", [GRIDS[0], Grid((64, 64, 64), 10.0)], ids=["2d", "3d"])
@pytest.mark.parametrize("diameter", [150.0, 200.0])
def test_air_spaces_fill_most_and_have_configured_size(grid, diameter):
    t = build_tissue(LungConfig(disease=False, bundle=False, alveolar_diameter_um=diameter), grid, seed=0)
    vf = t.volume_fractions()
    assert vf["alveolar_air"] > 0.6, vf
    d = equivalent_diameters(t.labels[0] == AIR if grid.ndim == 2 else t.labels == AIR, grid.dx, grid.ndim)
    assert d.size >= 5
    assert abs(np.median(d) - diameter) < 0.12 * diameter, (np.median(d), d.size)


@pytest.mark.parametrize("grid", GRIDS, ids=["2d", "3d"])
def test_septal_thickness_healthy_and_ild(grid):
    taus = {}
    for disease in (False, True):
        t = build_tissue(LungConfig(disease=disease, bundle=False), grid, seed=1)
        air, wall = _parenchyma(t)
        taus[disease] = wall_thickness(wall, air, grid.dx, grid.ndim)
    # healthy 5-10 um is drawn as one (face-connected) voxel at dx = 10 um
    assert 8.0 <= taus[False] <= 20.0, taus
    # ILD: 20-50 um (configured 30 um)
    assert 20.0 <= taus[True] <= 50.0, taus
    assert taus[True] > 1.8 * taus[False]


def test_capillaries_sit_in_septa():
    t = build_tissue(LungConfig(disease=True, bundle=False), Grid((1, 128, 128), 10.0), seed=2)
    lab = t.labels[0]
    cap = lab == CAPILLARY
    frac = cap.sum() / (cap | (lab == SEPTUM)).sum()
    assert 0.05 < frac < 0.6
    # every capillary voxel borders air or septum, never floats in the bundle
    assert not (ndimage.binary_dilation(cap) & ((lab == AIRWAY_LUMEN) | (lab == ARTERY))).any()


@pytest.mark.parametrize("grid", GRIDS, ids=["2d", "3d"])
def test_bronchovascular_bundle(grid):
    sick = build_tissue(LungConfig(disease=True), grid, seed=3)
    well = build_tissue(LungConfig(disease=False), grid, seed=3)
    for t in (sick, well):
        assert (t.labels == AIRWAY_LUMEN).any() and (t.labels == ARTERY).any()
        assert not t.open_mask()[t.labels == AIRWAY_LUMEN].any()
        assert t.vessel_mask()[t.labels == ARTERY].all()
    assert (sick.labels == LYMPHOID).any()  # iBALT with disease
    assert not (well.labels == LYMPHOID).any()
    air = sick.labels == AIR
    assert (sick.diffusion_multiplier("il6")[air] == 0).all()  # air is closed to fields
    if grid.ndim == 3:  # the airway runs along x
        lumen = sick.labels == AIRWAY_LUMEN
        assert (lumen == lumen[:, :, :1]).all()
