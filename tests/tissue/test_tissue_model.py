"""Tissue data model: masks, multipliers, fractions, HDF5 round trip."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from tissuesim.grid import Grid
from tissuesim.tissue import Compartment, MuscleConfig, Tissue, build_tissue


def _toy():
    grid = Grid((1, 3, 4), 10.0)
    labels = np.array([[[0, 1, 2, 0], [1, 1, 2, 0], [0, 0, 0, 0]]], np.uint8)
    comps = [
        Compartment("open", True),
        Compartment("closed", False, diffusion={"ifng": 0.1}, default_diffusion=0.5),
        Compartment("vessel", True, vessel=True),
    ]
    return Tissue(grid, labels, comps)


def test_masks_and_multipliers_follow_labels():
    t = _toy()
    assert t.names == ["open", "closed", "vessel"]
    np.testing.assert_array_equal(t.open_mask(), t.labels != 1)
    np.testing.assert_array_equal(t.vessel_mask(), t.labels == 2)
    m = t.diffusion_multiplier("ifng")
    assert m.dtype == np.float32 and m.shape == t.grid.shape
    np.testing.assert_allclose(m, np.where(t.labels == 1, 0.1, 1.0))
    np.testing.assert_allclose(t.diffusion_multiplier("il6"), np.where(t.labels == 1, 0.5, 1.0))
    vf = t.volume_fractions()
    assert vf == pytest.approx({"open": 7 / 12, "closed": 3 / 12, "vessel": 2 / 12})


def test_bad_tissue_inputs_are_rejected():
    g = Grid((1, 3, 4), 10.0)
    with pytest.raises(ValueError, match="shape"):
        Tissue(g, np.zeros((1, 4, 3), np.uint8), [Compartment("a", True)])
    with pytest.raises(ValueError, match="uint8"):
        Tissue(g, np.zeros((1, 3, 4), np.int32), [Compartment("a", True)])
    with pytest.raises(ValueError, match="label value 1"):
        Tissue(g, np.ones((1, 3, 4), np.uint8), [Compartment("a", True)])
    with pytest.raises(ValueError, match="unknown field"):
        Compartment("a", True, diffusion={"tnf": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        Compartment("a", True, diffusion={"il6": -1.0})
    with pytest.raises(ValueError, match="field 'tnf': unknown"):
        _toy().diffusion_multiplier("tnf")


def test_hdf5_round_trip(tmp_path):
    grid = Grid((1, 40, 40), 10.0)
    t = build_tissue(MuscleConfig(), grid, seed=3)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        t.to_hdf5_group(f.create_group("tissue"))
    with h5py.File(tmp_path / "t.h5", "r") as f:
        ds = f["tissue/labels"]
        assert ds.dtype == np.uint8 and ds.shape == grid.shape
        assert json.loads(ds.attrs["names"]) == t.names
        back = Tissue.from_hdf5_group(f["tissue"], grid)
    np.testing.assert_array_equal(back.labels, t.labels)
    assert back.compartments == t.compartments
    assert back.meta["generator"] == "muscle"
    for name in ("ifng", "autoantibody", "damage"):
        np.testing.assert_array_equal(back.diffusion_multiplier(name), t.diffusion_multiplier(name))
