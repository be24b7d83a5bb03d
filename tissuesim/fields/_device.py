"""Which Backend an array lives on (for the plain-array API and the CUDA launchers)."""

from __future__ import annotations

from tissuesim.backend import NUMPY, Backend


def is_cupy_array(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def backend_of(a) -> Backend:
    """NUMPY for host arrays, the cupy Backend of the array's device for CuPy arrays."""
    if not is_cupy_array(a):
        return NUMPY
    import cupy

    return Backend("cupy", cupy, int(a.device.id))
