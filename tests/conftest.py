"""Shared fixtures: every physics test runs on each available backend.

``be`` is parametrised over numpy and cupy; the cupy case skips cleanly where no GPU answers, so
the same suite is the CPU check in CI and the GPU check on a GPU machine.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tissuesim import backend as bk
from tissuesim.backend import NUMPY, cupy_status, select_backend

_CUPY_OK, _CUPY_WHY = cupy_status()


def gpu_available() -> bool:
    return _CUPY_OK


requires_gpu = pytest.mark.skipif(not _CUPY_OK, reason=f"no GPU: {_CUPY_WHY}")


@pytest.fixture(scope="session")
def build_host_kernels(tmp_path_factory):
    """build(name, shim) -> ctypes.CDLL: the CUDA sources that ``shim`` (a .cpp in tests/)
    includes, built for the host with g++ into lib<name>.so and loaded; skips where g++ is missing.

    The shim supplies the CUDA built-ins (tests/fields/cuda_host_shim.cpp); -ffp-contract=off, as
    NVRTC's --fmad=false, keeps fused multiply-adds out, so float arithmetic rounds as NumPy's.
    """

    def build(name: str, shim: Path):
        cxx = shutil.which("g++")
        if cxx is None:
            pytest.skip("g++ not found: no host emulation of the CUDA kernels")
        out = tmp_path_factory.mktemp(f"emu_{name}") / f"lib{name}.so"
        flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC"]
        inc = [f"-I{bk.kernel_dir()}", f"-I{Path(__file__).resolve().parent / 'fields'}"]
        res = subprocess.run(
            [cxx, *flags, *inc, str(shim), "-o", str(out), "-pthread"], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        lib = ctypes.CDLL(str(out))
        lib.emu_set_1d.argtypes = [ctypes.c_uint] * 6
        lib.emu_set_1d.restype = None
        return lib

    return build


#: C types of kernel parameters -> NumPy dtypes (pointers) and scalar types (values)
KERNEL_PTR_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "unsigned char": np.uint8,
    "int": np.int32,
    "unsigned int": np.uint32,
    "i64": np.int64,
    "long long": np.int64,
    "unsigned long long": np.uint64,
}
KERNEL_SCALAR_TYPES = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "i64": np.int64,
    "long long": np.int64,
    "float": np.float32,
    "double": np.float64,
}


@pytest.fixture(scope="session")
def kernel_signatures():
    """signatures(filename) -> {kernel: [("ptr", dtype, const) or ("val", scalar type, False)]}
    for every extern "C" kernel of kernels/<filename>."""

    def signatures(filename: str) -> dict[str, list[tuple]]:
        src = bk.kernel_source(filename)
        sigs = {}
        for name, params in re.findall(r'extern "C" __global__ void (\w+)\s*\(([^)]*)\)', src):
            kinds = []
            for p in params.split(","):
                toks = p.replace("__restrict__", " ").replace("*", " * ").split()
                base = " ".join(t for t in toks[:-1] if t not in ("const", "*"))
                if "*" in toks:
                    kinds.append(("ptr", np.dtype(KERNEL_PTR_TYPES[base]), "const" in toks))
                else:
                    kinds.append(("val", KERNEL_SCALAR_TYPES[base], False))
            sigs[name] = kinds
        return sigs

    return signatures


def nvrtc_available() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, requires_gpu])])
def be(request):
    """A Backend: numpy always, cupy where a GPU answers."""
    if request.param == "numpy":
        return NUMPY
    return select_backend("cupy")


def pytest_collection_modifyitems(config, items):
    """Tests that take the ``gpu_be`` fixture are GPU tests: mark them so ``-m gpu`` selects them."""
    for item in items:
        if "gpu_be" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def gpu_be():
    """The cupy backend, or skip."""
    if not _CUPY_OK:
        pytest.skip(f"no GPU: {_CUPY_WHY}")
    return select_backend("cupy")


class _Recorder:
    """A run writer that keeps copies of the snapshots it is given and the checkpoint times, in
    order (log entries ("snapshot", day, fields, agents) and ("checkpoint", day))."""

    def __init__(self):
        self.log = []

    def write_snapshot(self, day, fields, agents):
        copy = {k: np.array(v) for k, v in fields.items()}, {k: np.array(v) for k, v in agents.items()}
        self.log.append(("snapshot", day, *copy))

    def write_checkpoint(self, day, arrays, meta):
        self.log.append(("checkpoint", day))

    def write_timeseries(self, day, row):
        pass

    def write_event(self, day, what, detail):
        pass


@pytest.fixture
def recorder():
    """The class of a writer that records what a Simulation.run writes (see _Recorder)."""
    return _Recorder
