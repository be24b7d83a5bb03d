"""Muscle geometry measured from the labels against literature ranges (MODEL.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tissuesim.grid import Grid
from tissuesim.tissue import MuscleConfig, build_tissue
from tissuesim.tissue.measure import components, count_components, equivalent_diameters, wall_thickness
from tissuesim.tissue.muscle import CAPILLARY, ENDOMYSIUM, FIBRE, PERIMYSIAL_VESSEL, PERIMYSIUM


def _section(t):
    """The transverse section: the 2D grid itself, or a y-z slice of a 3D grid."""
    return t.labels[0] if t.grid.ndim == 2 else t.labels[:, :, t.grid.nx // 2]


@pytest.mark.parametrize("dx", [5.0, 10.0])
def test_fibres_fill_most_of_the_section(dx):
    n = round(1000 / dx)
    t = build_tissue(MuscleConfig(), Grid((1, n, n), dx), seed=0)
    vf = t.volume_fractions()
    assert max(vf, key=vf.get) == "fibre"
    # Endomysium cannot be thinner than one voxel (0.2-1 um in life), so the fibre share falls
    # with dx: measured ~0.62 at 5 um, ~0.50 at 10 um (perimysium ~0.15 from 10-50 um septa).
    lo = 0.55 if dx <= 5 else 0.42
    assert lo <= vf["fibre"] <= 0.95, vf
    assert 0.05 <= vf["perimysium"] <= 0.3, vf


@pytest.mark.parametrize("diameter", [44.0, 60.0])
@pytest.mark.parametrize(
    "grid", [Grid((1, 128, 128), 10.0), Grid((48, 96, 8), 10.0), Grid((1, 200, 200), 5.0)]
)
def test_measured_fibre_diameter_follows_config(grid, diameter):
    t = build_tissue(MuscleConfig(fibre_diameter_um=diameter), grid, seed=1)
    d = equivalent_diameters(_section(t) == FIBRE, grid.dx, ndim=2, exclude_border=True)
    assert d.size >= 20
    assert abs(d.mean() - diameter) < 0.1 * diameter, (d.mean(), d.size)
    assert 0.08 < d.std() / d.mean() < 0.35  # fibre size spread, CV ~0.2 in biopsies


@pytest.mark.parametrize("cf", [1.1, 1.45, 1.8])
def test_capillary_to_fibre_ratio_measured_in_cross_section(cf):
    for grid in (Grid((1, 128, 128), 10.0), Grid((64, 64, 4), 10.0)):
        t = build_tissue(MuscleConfig(capillary_to_fibre=cf), grid, seed=2)
        sec = _section(t)
        ratio = count_components(sec == CAPILLARY) / count_components(sec == FIBRE)
        assert abs(ratio - cf) < 0.12, (grid.shape, ratio)
        # capillaries run in the endomysium on the fibre surface: each touches a fibre (3x3)
        near_fibre = ndimage.binary_dilation(sec == FIBRE, structure=np.ones((3, 3), bool))
        assert near_fibre[sec == CAPILLARY].all()
        # density in the 245-430 /mm^2 range scales with C/F: check the order of magnitude
        per_mm2 = count_components(sec == CAPILLARY) / (sec.size * grid.dx**2 / 1e6)
        assert 150 < per_mm2 < 1000


def test_fascicles_and_perimysium():
    t = build_tissue(MuscleConfig(), Grid((1, 200, 200), 10.0), seed=3)
    sec = t.labels[0]
    septal = (sec == PERIMYSIUM) | (sec == PERIMYSIAL_VESSEL)
    fasc, _ = components(~septal, exclude_border=True)
    fib, _ = components(sec == FIBRE)
    per = []
    for k in np.unique(fasc[fasc > 0]):
        inside = np.unique(fib[(fasc == k) & (fib > 0)])
        if (fasc == k).sum() > 100:  # ignore crumbs between vessel cuffs
            per.append(inside.size)
    per = np.array(per)
    assert per.size >= 3
    assert 20 <= np.median(per) <= 80, per
    tau = wall_thickness(sec == PERIMYSIUM, (sec == FIBRE) | (sec == ENDOMYSIUM), 10.0, 2)
    assert 10.0 <= tau <= 60.0, tau
    assert count_components(sec == PERIMYSIAL_VESSEL) >= 1


def test_3d_fibres_are_prisms_along_x():
    t = build_tissue(MuscleConfig(), Grid((20, 40, 30), 10.0), seed=0)
    assert (t.labels == t.labels[:, :, :1]).all()
    assert t.meta["fibre_axis"] == "x"


def test_perifascicular_damage():
    t = build_tissue(MuscleConfig(disease=True), Grid((1, 200, 200), 10.0), seed=4)
    sec, dmg = t.labels[0], t.initial_fields["damage"][0]
    d = ndimage.distance_transform_edt(sec != PERIMYSIUM, sampling=10.0)
    fibre = sec == FIBRE
    edge, deep = fibre & (d <= 10.0), fibre & (d >= 80.0)
    assert edge.sum() > 50 and deep.sum() > 50
    assert dmg[edge].mean() > 3 * dmg[deep].mean()
    assert (dmg[~fibre] == 0).all()
    healthy = build_tissue(MuscleConfig(disease=False), Grid((1, 200, 200), 10.0), seed=4)
    assert (healthy.initial_fields["damage"] == 0).all()
