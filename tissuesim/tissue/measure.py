"""Measurements on label volumes (morphometry), independent of how a tissue was made.

Used by the tests to check generated tissues against literature ranges, and by researchers to
report what a tissue actually contains. All lengths in um.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from tissuesim.tissue._geometry import face_structure
from tissuesim.tissue.base import Tissue


def unreachable_open_voxels(tissue: Tissue) -> int:
    """Open voxels with no face-connected path through open voxels to any vessel voxel."""
    open_m, ves = tissue.open_mask(), tissue.vessel_mask()
    comp, n = ndimage.label(open_m, structure=face_structure(3))
    reach = np.bincount(comp[ves], minlength=n + 1) > 0
    reach[0] = True
    return int((~reach[comp]).sum())


def components(mask: np.ndarray, exclude_border: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Face-connected components of a 2D or 3D bool mask.

    Returns (label image int32, sizes in voxels of the kept components). With exclude_border,
    components touching the array faces (cut by the box, size unknown) are dropped.
    """
    lab, n = ndimage.label(mask, structure=face_structure(mask.ndim))
    keep = np.ones(n + 1, bool)
    keep[0] = False
    if exclude_border:
        for ax in range(mask.ndim):
            if mask.shape[ax] > 1:
                keep[np.unique(np.take(lab, 0, axis=ax))] = False
                keep[np.unique(np.take(lab, -1, axis=ax))] = False
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    return lab, sizes[keep]


def equivalent_diameters(mask: np.ndarray, dx: float, ndim: int, exclude_border: bool = True) -> np.ndarray:
    """Equivalent diameters (um) of the components of ``mask``: circles of equal area if ndim == 2
    (mask is a 2D section), spheres of equal volume if ndim == 3."""
    _, sizes = components(mask, exclude_border)
    if ndim == 2:
        return np.sqrt(4.0 * sizes * dx * dx / math.pi)
    return np.cbrt(6.0 * sizes * dx**3 / math.pi)


def count_components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=face_structure(mask.ndim))[1])


def wall_thickness(wall: np.ndarray, space: np.ndarray, dx: float, ndim: int) -> float:
    """Arithmetic mean thickness (um) of walls separating spaces: tau = 2 V_wall / S.

    S counts voxel faces between ``wall`` and ``space``, corrected for the staircase of a voxelised
    surface of random orientation (the face count over-estimates S by E(|n|_1): 3/2 in 3D, 4/pi in 2D).
    wall, space : bool masks of one array (2D section or 3D).
    """
    faces = 0
    for ax in range(wall.ndim):
        if wall.shape[ax] < 2:
            continue
        w, s = np.swapaxes(wall, 0, ax), np.swapaxes(space, 0, ax)
        faces += int(np.sum(w[1:] & s[:-1]) + np.sum(w[:-1] & s[1:]))
    if faces == 0:
        return float("nan")
    if ndim == 3:
        area = faces * dx * dx / 1.5
        vol = wall.sum() * dx**3
    else:
        area = faces * dx * math.pi / 4
        vol = wall.sum() * dx * dx
    return 2.0 * vol / area


def layer_runs(labels: np.ndarray, value: int, axis: int = 1) -> np.ndarray:
    """Number of voxels of ``value`` in every line along ``axis`` (e.g. lining thickness per column)."""
    return (labels == value).sum(axis=axis)
