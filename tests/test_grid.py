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
    # beyond int64 (clipped to the nearest face), NaN (to 0), tiny and signed zeros
    pos[500:510] = np.float32(
        [[-3e9], [3e9], [np.nan], [1e-30], [-1e-30], [-0.0], [3e38], [-3e38], [5.0], [7.0]]
    )
    with np.errstate(invalid="ignore"):
        ref = grid.voxel_index(pos)
        got = grid._voxel_index_columns(be.asarray(pos), be.xp)
    _, j, i = np.unravel_index(ref[506:508], grid.shape)
    assert (i == [grid.nx - 1, 0]).all() and (j == [grid.ny - 1, 0]).all() and ref[502] == 0
    np.testing.assert_array_equal(be.asnumpy(got), ref)
    np.testing.assert_array_equal(be.asnumpy(grid.voxel_index(be.asarray(pos), xp=be.xp)), ref)


@pytest.mark.parametrize("grid", [Grid((1, 30, 40), 10.0, origin=(5.0, -20.0, 0.0)), Grid((7, 9, 11), 2.5)])
def test_device_form_equals_voxel_index(emulated_cupy, grid):
    """The forms CuPy takes give the NumPy form's indices, on the emulated CuPy (on a GPU the
    test above covers them): float32 positions (the cells') in one launch of voxel_index_fill,
    nothing uploaded; others with the grid's origin, bounds and strides put on the device once.
    Positions outside the grid, on voxel faces, far away and NaN."""
    rs = np.random.default_rng(1)
    lo = np.array(grid.origin) - 5.0
    hi = np.array(grid.origin) + np.array(grid.extent_um) + 5.0
    pos = (lo + rs.random((3000, 3)) * (hi - lo)).astype(np.float32)
    pos[:400, 1] = (grid.origin[1] + rs.integers(0, grid.ny + 1, 400) * grid.dx).astype(np.float32)
    pos[400:410] = np.float32(
        [[-3e9], [3e9], [np.nan], [1e-30], [-1e-30], [-0.0], [3e38], [-3e38], [5.0], [7.0]]
    )
    xp = emulated_cupy.xp
    emu = xp.emulation
    for dtype, uploads, kernel in ((np.float32, 0, 1), (np.float64, 3, 0)):
        p = pos.astype(dtype)
        dev = emulated_cupy.asarray(p)
        k = len(xp.launches)
        with emu.counted():
            for _ in range(2):
                got = grid.voxel_index(dev, xp=xp)
        with np.errstate(invalid="ignore"):
            want = grid.voxel_index(p)
        np.testing.assert_array_equal(emulated_cupy.asnumpy(got), want)
        # tables went up once (first call) if at all, nothing is read back
        assert len(emu.uploads) == uploads and emu.waits == []
        assert sum(name == "voxel_index_fill" for name, _ in xp.launches[k:]) == 2 * kernel
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
    pos = np.random.default_rng(2).uniform(-5, 60, (200, 3))  # float64: the table form
    got = grid.voxel_index(emulated_cupy.asarray(pos), xp=xp)
    np.testing.assert_array_equal(emulated_cupy.asnumpy(got), grid.voxel_index(pos))
    assert bk._CONSTANTS == {}  # emulated_cupy starts it empty: nothing was cached
