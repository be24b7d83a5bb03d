"""Joint layers measured from the labels (MODEL.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest

from tissuesim.grid import Grid
from tissuesim.tissue import JointConfig, build_tissue
from tissuesim.tissue.joint import BONE, CARTILAGE, FLUID, LINING, LYMPHOID, SUBLINING, VESSEL
from tissuesim.tissue.measure import layer_runs

GRIDS = [Grid((1, 128, 96), 10.0), Grid((16, 96, 48), 10.0)]
RANK = np.array([0, 1, 2, 3, 4, 4, 4])  # bone, cartilage, fluid, lining, sublining (+ vessel, aggregate)


@pytest.mark.parametrize("grid", GRIDS, ids=["2d", "3d"])
@pytest.mark.parametrize("disease", [False, True])
def test_layers_in_order_along_y(grid, disease):
    t = build_tissue(JointConfig(disease=disease), grid, seed=0)
    r = RANK[t.labels]
    assert (np.diff(r, axis=1) >= 0).all()  # never goes back along y in any (z, x) column
    for v in (BONE, CARTILAGE, FLUID, LINING, SUBLINING, VESSEL):
        assert (t.labels == v).any(), t.names[v]
    assert (t.labels == LYMPHOID).any() == disease
    assert not t.open_mask()[(t.labels == BONE) | (t.labels == CARTILAGE)].any()
    cart = t.diffusion_multiplier("autoantibody")[t.labels == CARTILAGE]
    assert (cart < t.diffusion_multiplier("autoantibody")[t.labels == FLUID].min()).all()


@pytest.mark.parametrize("grid", GRIDS, ids=["2d", "3d"])
@pytest.mark.parametrize(
    "disease, lining, key",
    [(False, 30.0, "lining_um"), (True, 150.0, "lining_ra_um"), (True, 110.0, "lining_ra_um")],
)
def test_lining_thickness_measured_per_column(grid, disease, lining, key):
    t = build_tissue(JointConfig(disease=disease, **{key: lining}), grid, seed=1)
    thick = layer_runs(t.labels, LINING, axis=1) * grid.dx  # (nz, nx) um
    assert abs(thick.mean() - lining) <= 0.5 * grid.dx, thick.mean()
    assert thick.min() >= lining - grid.dx
    # the surface undulates (villi): the fluid|lining boundary is not flat
    first = np.argmax(t.labels == LINING, axis=1)
    assert first.max() > first.min()


def test_grid_too_short_for_layers_is_a_clear_error():
    with pytest.raises(ValueError, match=r"grid\.ny=4"):
        build_tissue(JointConfig(disease=True), Grid((1, 4, 32), 10.0), seed=0)
