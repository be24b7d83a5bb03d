"""Boundary conditions on the six faces of the domain.

A boundary specification is a mapping face -> condition, faces 'x-', 'x+', 'y-', 'y+', 'z-', 'z+';
a face left out is zero-flux. A condition is one of

- ``'zero_flux'`` (default; also ``'neumann'``): no flux through the face.
- a number ``g``, ``('dirichlet', g)`` or ``{'kind': 'dirichlet', 'value': g}``: the field equals g
  (its units) on the face, half a voxel from the boundary voxel's centre (ghost = 2 g - u).
- ``'periodic'``: the axis wraps; both faces of the axis must say so, and a periodic axis needs at
  least 3 voxels for the implicit (cyclic tridiagonal) solve.

In 2D (nz == 1) the z faces must stay zero-flux: the slab has no z neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tissuesim.fields.ops import BC_DIRICHLET, BC_PERIODIC, BC_ZERO_FLUX

FACES = ("x-", "x+", "y-", "y+", "z-", "z+")
_KIND_NAMES = {
    "zero_flux": BC_ZERO_FLUX,
    "neumann": BC_ZERO_FLUX,
    "dirichlet": BC_DIRICHLET,
    "periodic": BC_PERIODIC,
}


def _parse(face: str, cond, who: str) -> tuple[int, float]:
    if isinstance(cond, bool):
        raise ValueError(f"{who}: boundary {face}={cond!r}: use 'zero_flux', 'periodic' or a Dirichlet value")
    if isinstance(cond, (int, float, np.floating, np.integer)):
        return BC_DIRICHLET, float(cond)
    if isinstance(cond, str):
        kind = _KIND_NAMES.get(cond.lower())
        if kind is None or kind == BC_DIRICHLET:
            raise ValueError(
                f"{who}: boundary {face}={cond!r}: allowed are 'zero_flux', 'periodic', a number "
                "or ('dirichlet', value)"
            )
        return kind, 0.0
    if isinstance(cond, Mapping):
        cond = (cond.get("kind"), cond.get("value", 0.0))
    if isinstance(cond, (tuple, list)) and len(cond) == 2 and str(cond[0]).lower() == "dirichlet":
        return BC_DIRICHLET, float(cond[1])
    raise ValueError(f"{who}: boundary {face}={cond!r} not understood")


def normalize_bc(
    bc: Mapping | None, shape: tuple[int, int, int], who: str = "field"
) -> tuple[np.ndarray, np.ndarray]:
    """(kinds int32 (6,), values float64 (6,)) from a boundary mapping, checked against ``shape``.

    shape : (nz, ny, nx) of the grid. Raises ValueError (one line naming ``who`` and the face).
    """
    bc = dict(bc or {})
    unknown = set(bc) - set(FACES)
    if unknown:
        raise ValueError(f"{who}: unknown boundary face(s) {sorted(unknown)}; faces are {', '.join(FACES)}")
    kinds = np.zeros(6, dtype=np.int32)
    vals = np.zeros(6, dtype=np.float64)
    for i, face in enumerate(FACES):
        if face in bc:
            kinds[i], vals[i] = _parse(face, bc[face], who)
    nz, ny, nx = shape
    for a, n in zip("xyz", (nx, ny, nz)):
        lo, hi = kinds[2 * "xyz".index(a)], kinds[2 * "xyz".index(a) + 1]
        if (lo == BC_PERIODIC) != (hi == BC_PERIODIC):
            raise ValueError(f"{who}: boundary {a}- and {a}+ must both be 'periodic' or neither")
        if lo == BC_PERIODIC and n < 3:
            raise ValueError(f"{who}: periodic {a} axis needs >= 3 voxels, the grid has {n}")
    if nz == 1 and (kinds[4] != BC_ZERO_FLUX or kinds[5] != BC_ZERO_FLUX):
        raise ValueError(f"{who}: a 2D grid (nz == 1) has no z neighbours; z-/z+ must be zero_flux")
    return kinds, vals
