"""Grid.voxel_index: the NumPy fast form and the column form the GPU takes agree."""

from __future__ import annotations

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
