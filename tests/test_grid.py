"""Grid.voxel_index: the NumPy fast form and the column form the GPU takes agree."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tissuesim.grid import Grid


@pytest.mark.parametrize("grid", [Grid((1, 30, 40), 10.0, origin=(5.0, -20.0, 0.0)), Grid((7, 9, 11), 2.5)])
def test_column_form_equals_voxel_index(be, grid):
    rs = np.random.default_rng(0)
    lo = np.array(grid.origin) - 5.0
    hi = np.array(grid.origin) + np.array(grid.extent_um) + 5.0  # some outside: clipped
    pos = (lo + rs.random((4000, 3)) * (hi - lo)).astype(np.float32)
    # exactly on voxel faces
    pos[:500, 0] = (grid.origin[0] + rs.integers(0, grid.nx + 1, 500) * grid.dx).astype(np.float32)
    ref = grid.voxel_index(pos)
    got = grid._voxel_index_columns(be.asarray(pos), be.xp)
    np.testing.assert_array_equal(be.asnumpy(got), ref)
    np.testing.assert_array_equal(be.asnumpy(grid.voxel_index(be.asarray(pos), xp=be.xp)), ref)


@pytest.mark.parametrize("grid", [Grid((1, 30, 40), 10.0, origin=(5.0, -20.0, 0.0)), Grid((7, 9, 11), 2.5)])
def test_device_form_equals_voxel_index(emulated_cupy, grid):
    """The form CuPy takes (the grid's origin, bounds and strides put on the device once) gives
    the NumPy form's indices, on the emulated CuPy (on a GPU the test above covers it)."""
    rs = np.random.default_rng(1)
    lo = np.array(grid.origin) - 5.0
    hi = np.array(grid.origin) + np.array(grid.extent_um) + 5.0
    pos = (lo + rs.random((3000, 3)) * (hi - lo)).astype(np.float32)
    pos[:400, 1] = (grid.origin[1] + rs.integers(0, grid.ny + 1, 400) * grid.dx).astype(np.float32)
    xp = emulated_cupy.xp
    dev = emulated_cupy.asarray(pos)
    emu = xp.emulation
    with emu.counted():
        for _ in range(2):
            got = grid.voxel_index(dev, xp=xp)
    np.testing.assert_array_equal(emulated_cupy.asnumpy(got), grid.voxel_index(pos))
    # tables went up once (first call), nothing is read back, and the Grid stays picklable
    assert len(emu.uploads) == 3 and emu.waits == []
    assert pickle.loads(pickle.dumps(grid)) == grid


def test_device_form_makes_no_tables_while_a_capture_records(emulated_cupy, monkeypatch):
    """Inside a CUDA stream capture an upload would only be recorded: voxel_index then takes the
    column form (the same indices) and caches nothing."""
    import types

    from tissuesim import backend as bk

    grid = Grid((3, 5, 4), 10.0, origin=(1.0, 2.0, 3.0))
    xp = emulated_cupy.xp
    capturing = types.SimpleNamespace(is_capturing=lambda: True)
    monkeypatch.setattr(xp.cuda, "get_current_stream", lambda: capturing)
    pos = np.random.default_rng(2).uniform(-5, 60, (200, 3)).astype(np.float32)
    got = grid.voxel_index(emulated_cupy.asarray(pos), xp=xp)
    np.testing.assert_array_equal(emulated_cupy.asnumpy(got), grid.voxel_index(pos))
    assert bk._CONSTANTS == {}  # emulated_cupy starts it empty: nothing was cached
