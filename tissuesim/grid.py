"""The voxel grid every field and every cell lives on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A uniform cell-centred voxel grid.

    Attributes
    ----------
    shape : (nz, ny, nx) ints. ``nz == 1`` means a 2D simulation in the x-y plane.
    dx : voxel edge length in um (the same along every axis).
    origin : (x0, y0, z0) in um, the position of the outer corner of voxel (0, 0, 0).

    Voxel (k, j, i) covers x in [x0 + i dx, x0 + (i+1) dx) and likewise for y (j) and z (k);
    its centre is at x0 + (i + 1/2) dx. Positions of cells are stored as (x, y, z) in um; arrays
    of the grid are indexed [z, y, x] (C order, x fastest), matching the HDF5 layout.
    """

    shape: tuple[int, int, int]
    dx: float = 10.0
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(n) < 1 for n in self.shape):
            raise ValueError(f"grid shape must be three positive ints (nz, ny, nx), got {self.shape}")
        if not self.dx > 0:
            raise ValueError(f"grid dx must be > 0 um, got {self.dx}")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))

    @property
    def nz(self) -> int:
        return self.shape[0]

    @property
    def ny(self) -> int:
        return self.shape[1]

    @property
    def nx(self) -> int:
        return self.shape[2]

    @property
    def ndim(self) -> int:
        """2 when nz == 1, else 3."""
        return 2 if self.nz == 1 else 3

    @property
    def n_voxels(self) -> int:
        return self.nz * self.ny * self.nx

    @property
    def voxel_volume_um3(self) -> float:
        """Volume of one voxel in um^3; in 2D the slab is one voxel (dx) thick."""
        return self.dx**3

    @property
    def extent_um(self) -> tuple[float, float, float]:
        """(Lx, Ly, Lz) in um."""
        return (self.nx * self.dx, self.ny * self.dx, self.nz * self.dx)

    def centres(self, axis: str) -> np.ndarray:
        """Voxel-centre coordinates along 'x', 'y' or 'z' in um, float64 (n,)."""
        i = "xyz".index(axis)
        n = (self.nx, self.ny, self.nz)[i]
        return self.origin[i] + (np.arange(n) + 0.5) * self.dx

    def voxel_index(self, positions, xp=np):
        """Flat voxel index of each position, clipped to the grid.

        positions : (n, 3) float array of x, y, z in um (numpy or cupy, as ``xp``).
        Returns int64 (n,) flat indices into a C-ordered (nz, ny, nx) array.
        Per axis floor((x - origin) / dx) in the positions' precision, clipped to [0, n - 1]
        before the conversion to integers (so a position far outside, beyond the integers' range,
        clips to the nearest face, and NaN to 0, on every backend).
        """
        if xp is np and positions.ndim == 2:
            # the arithmetic of _voxel_index_columns in fewer array operations: clip = fmax then
            # fmin (NaN -> 0), and the flat index k nx ny + j nx + i as one integer product
            upper, strides = self._index_tables()
            c = positions - np.asarray(self.origin, dtype=positions.dtype)
            c /= self.dx
            np.floor(c, out=c)
            np.fmax(c, 0, out=c)
            np.fmin(c, upper.astype(c.dtype), out=c)
            return c.astype(np.int64) @ strides
        if (
            positions.ndim == 2
            and positions.shape[1] == 3
            and positions.dtype == np.float32
            and positions.flags.c_contiguous
            and positions.shape[0] < 2**31 - 4096  # the kernel's int thread index
        ):
            # the same arithmetic in one launch of the kernel voxel_index_fill (agents.cu)
            from tissuesim.agents import _kernels as K
            from tissuesim.fields._device import backend_of

            n = int(positions.shape[0])
            out = xp.empty(n, dtype=xp.int64)
            f = np.float32
            K.launch(
                backend_of(positions),
                "voxel_index_fill",
                n,
                (
                    positions,
                    np.int32(n),
                    *(f(o) for o in self.origin),
                    f(self.dx),
                    np.int32(self.nx),
                    np.int32(self.ny),
                    np.int32(self.nz),
                    out,
                ),
            )
            return out
        if positions.ndim == 2 and positions.shape[1] == 3:
            # the same arithmetic on the device, with the grid's tables put there once: some 8
            # array operations (CuPy launches) instead of the column form's 19
            from tissuesim.backend import device_table

            device = getattr(positions, "device", None)
            origin = np.asarray(self.origin, dtype=positions.dtype)
            upper, strides = self._index_tables()
            tables = [
                device_table(xp, t, device, in_capture=False)
                for t in (origin, upper.astype(positions.dtype), strides)
            ]
            if any(t is None for t in tables):  # first call inside a stream capture
                return self._voxel_index_columns(positions, xp)
            origin, upper, strides = tables
            c = positions - origin
            c /= self.dx
            xp.floor(c, out=c)
            xp.fmax(c, 0, out=c)
            xp.fmin(c, upper, out=c)
            ijk = c.astype(xp.int64)
            ijk *= strides
            return ijk.sum(axis=1)
        return self._voxel_index_columns(positions, xp)

    def _index_tables(self):
        """int64 (3,) per-axis upper bounds and flat strides of (i, j, k), made once."""
        tables = self.__dict__.get("_index_tables_")
        if tables is None:
            nz, ny, nx = self.shape
            tables = (
                np.array([nx - 1, ny - 1, nz - 1], dtype=np.int64),
                np.array([1, nx, nx * ny], dtype=np.int64),
            )
            object.__setattr__(self, "_index_tables_", tables)
        return tables

    def _voxel_index_columns(self, positions, xp):
        """voxel_index one axis at a time with the origin as scalars: the same float32 and int64
        arithmetic, without copying the origin to the device (a host-to-device copy, which a
        CUDA graph capture refuses)."""
        f = positions.dtype.type
        flat = None
        stride = 1
        for a, n in enumerate((self.nx, self.ny, self.nz)):
            c = xp.floor((positions[:, a] - f(self.origin[a])) / self.dx)
            c = xp.fmin(xp.fmax(c, 0), n - 1).astype(xp.int64)
            flat = c if flat is None else flat + c * stride
            stride *= n
        return flat
