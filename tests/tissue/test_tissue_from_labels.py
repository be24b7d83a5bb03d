"""Tissue from a label volume + YAML map: round trip and one clear error per bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import yaml

from tissuesim.grid import Grid
from tissuesim.tissue import FromLabelsConfig, JointConfig, MuscleConfig, build_tissue
from tissuesim.tissue.from_labels import LabelMapError, write_label_map
from tissuesim.tissue.measure import unreachable_open_voxels

GRID = Grid((1, 48, 64), 10.0)
GRID_3D = Grid((8, 24, 32), 10.0)


def _save(tmp_path, tissue, fmt="npy"):
    vol = tissue.labels
    if fmt == "npy":
        path = tmp_path / "labels.npy"
        np.save(path, vol)
    elif fmt == "h5":
        path = tmp_path / "labels.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("seg/labels", data=vol)
    else:
        tifffile = pytest.importorskip("tifffile")
        path = tmp_path / "labels.tif"
        tifffile.imwrite(path, vol)
    write_label_map(tmp_path / "map.yaml", tissue.compartments)
    return path, tmp_path / "map.yaml"


@pytest.mark.parametrize("fmt", ["npy", "h5", "tif"])
@pytest.mark.parametrize("grid", [GRID, GRID_3D], ids=["2d", "3d"])
def test_round_trip_of_a_generated_tissue(tmp_path, fmt, grid):
    src = build_tissue(MuscleConfig(), grid, seed=4)
    path, mp = _save(tmp_path, src, fmt)
    cfg = FromLabelsConfig(path=str(path), map=str(mp), dataset="seg/labels" if fmt == "h5" else None)
    t = build_tissue(cfg, grid, seed=4)
    np.testing.assert_array_equal(t.labels, src.labels)
    assert t.compartments == src.compartments
    for f in ("ifng", "autoantibody", "damage"):
        np.testing.assert_array_equal(t.diffusion_multiplier(f), src.diffusion_multiplier(f))
    assert unreachable_open_voxels(t) == 0 and t.meta["unreachable_open_voxels"] == 0
    free = t.open_mask() & ~t.vessel_mask()
    for pos in t.initial_cells.values():
        assert free.ravel()[grid.voxel_index(pos)].all()
    assert len(t.initial_cells["plasma_cell"]) > 0


def test_2d_volume_and_sparse_label_values(tmp_path):
    src = build_tissue(JointConfig(), GRID, seed=0)
    vol = src.labels[0].astype(np.uint16) * 100  # values 0, 100, ..., 600 in a (ny, nx) image
    np.save(tmp_path / "v.npy", vol)
    mp = {
        int(i * 100): {"name": c.name, "open_to_cells": c.open_to_cells, "vessel": c.vessel}
        for i, c in enumerate(src.compartments)
    }
    mp[999] = {"name": "unused", "open_to_cells": False}  # in the map, absent from the volume: kept
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(mp))
    t = build_tissue(FromLabelsConfig(path=str(tmp_path / "v.npy"), map=str(tmp_path / "m.yaml")), GRID, 0)
    np.testing.assert_array_equal(t.labels, src.labels)
    assert t.names == [*src.names, "unused"]
    assert t.meta["source_label_values"] == [*range(0, 700, 100), 999]


@pytest.fixture
def good(tmp_path):
    src = build_tissue(MuscleConfig(), GRID, seed=0)
    path, mp = _save(tmp_path, src)
    return src, path, mp


def _build(path, mp, **kw):
    return build_tissue(FromLabelsConfig(path=str(path), map=str(mp), **kw), GRID, 0)


def test_missing_volume_file(good, tmp_path):
    _, _, mp = good
    with pytest.raises(LabelMapError, match=r"tissue.path=.*nope.npy.*file not found"):
        _build(tmp_path / "nope.npy", mp)


def test_missing_map_file(good, tmp_path):
    _, path, _ = good
    with pytest.raises(LabelMapError, match=r"tissue.map=.*nope.yaml.*file not found"):
        _build(path, tmp_path / "nope.yaml")


def test_label_in_volume_not_in_map(good, tmp_path):
    src, path, mp = good
    vol = src.labels.copy()
    vol[0, 0, :3] = 7
    np.save(path, vol)
    with pytest.raises(LabelMapError, match=r"label value\(s\) \[7\].*no entry; map has \[0, 1, 2, 3, 4\]"):
        _build(path, mp)


def test_wrong_dimensions(good, tmp_path):
    src, _, mp = good
    np.save(tmp_path / "bad.npy", src.labels[:, :, :-1])
    with pytest.raises(LabelMapError, match=r"shape \(1, 48, 63\) does not match grid"):
        _build(tmp_path / "bad.npy", mp)


def test_unknown_compartment_property(good, tmp_path):
    _, path, mp = good
    raw = yaml.safe_load(open(mp))
    raw[1]["permeability"] = 0.5
    (tmp_path / "m2.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(
        LabelMapError, match=r"tissue.map\[1\].permeability: unknown compartment property; allowed: name"
    ):
        _build(path, tmp_path / "m2.yaml")


def test_missing_required_property(good, tmp_path):
    _, path, mp = good
    raw = yaml.safe_load(open(mp))
    del raw[2]["open_to_cells"]
    (tmp_path / "m3.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(LabelMapError, match=r"tissue.map\[2\].open_to_cells: missing"):
        _build(path, tmp_path / "m3.yaml")


def test_unknown_field_in_diffusion(good, tmp_path):
    _, path, mp = good
    raw = yaml.safe_load(open(mp))
    raw[0]["diffusion"] = {"tnf": 0.5}
    (tmp_path / "m4.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(LabelMapError, match=r"tissue.map\[0\].diffusion.tnf: unknown field"):
        _build(path, tmp_path / "m4.yaml")


def test_hdf5_needs_an_existing_dataset(good, tmp_path):
    src, _, mp = good
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["labels"] = src.labels
    with pytest.raises(LabelMapError, match=r"tissue\.dataset=None"):
        _build(tmp_path / "v.h5", mp)
    with pytest.raises(LabelMapError, match=r"tissue\.dataset='seg'.*no such dataset"):
        _build(tmp_path / "v.h5", mp, dataset="seg")


def test_float_volume_and_unknown_format(good, tmp_path):
    src, _, mp = good
    np.save(tmp_path / "f.npy", src.labels.astype(np.float32))
    with pytest.raises(LabelMapError, match="label dtype float32"):
        _build(tmp_path / "f.npy", mp)
    (tmp_path / "v.raw").write_bytes(b"\0" * 10)
    with pytest.raises(LabelMapError, match=r"unknown format '\.raw'"):
        _build(tmp_path / "v.raw", mp)
