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


_CTYPE = {
    np.int32: ctypes.c_int32,
    np.uint32: ctypes.c_uint32,
    np.int64: ctypes.c_int64,
    np.float32: ctypes.c_float,
    np.float64: ctypes.c_double,
}
EMU_GUARD = 64  # poisoned bytes on each side of every array handed to an emulated kernel
# float32 guards read as 3.4e38 and float64 ones as NaN (an out-of-bounds read shows in the
# results), others as 0xA5A5...
_POISON = {np.dtype(np.float32): 0x7F, np.dtype(np.float64): 0xFF}


def _thread_order(order: str, nthreads: int, seed: int) -> np.ndarray:
    t = np.arange(nthreads)
    if order == "reverse":
        return t[::-1]
    if order == "shuffle":
        return np.random.default_rng(seed).permutation(nthreads)
    return t


class EmulatedKernel:
    """Stands in for a cupy.RawKernel whose source was built for the host (build_host_kernels):
    same call, strict checks, host run.

    ``sig`` is the kernel's entry of kernel_signatures; ``order`` is "forward", "reverse" or
    "shuffle" (the order the threads of the real grid run in, one by one); each call appends
    (name, args) to ``log``. Checks: argument count, pointer dtypes and C-contiguity, scalar types,
    a 1D launch shape; every array runs inside poisoned guard bytes that must come back untouched
    (out-of-bounds writes), const arrays must come back unchanged and no written array may alias
    another argument (__restrict__)."""

    def __init__(self, lib, name: str, sig: list[tuple], order: str, log: list):
        self.lib, self.name, self.sig, self.order, self.log = lib, name, sig, order, log

    def __call__(self, grid, block, args):
        nm = self.name
        assert isinstance(args, tuple), f"{nm}: arguments as {type(args)}"
        assert len(args) == len(self.sig), f"{nm}: {len(args)} arguments, signature has {len(self.sig)}"
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        assert all(isinstance(g, int) and g >= 1 for g in grid + block), (grid, block)
        assert grid[1:] == (1, 1) and block[1:] == (1, 1), f"{nm}: the kernels index in x only"
        assert block[0] <= 1024 and grid[0] < 2**31
        cargs, arrays = [], []
        for k, ((kind, t, const), a) in enumerate(zip(self.sig, args)):
            if kind == "ptr":
                assert isinstance(a, np.ndarray), f"{nm} arg {k}: pointer argument is {type(a)}"
                assert a.dtype == t, f"{nm} arg {k}: array of {a.dtype} where {t} expected"
                assert a.flags.c_contiguous, f"{nm} arg {k}: non-contiguous array"
                raw = a.reshape(-1).view(np.uint8)
                poison = _POISON.get(a.dtype, 0xA5)
                buf = np.full(raw.size + 2 * EMU_GUARD, poison, dtype=np.uint8)
                buf[EMU_GUARD : EMU_GUARD + raw.size] = raw
                arrays.append((k, a, raw, buf, poison, const, raw.copy() if const else None))
                cargs.append(ctypes.c_void_p(buf.ctypes.data + EMU_GUARD))
            else:
                assert type(a) is t, f"{nm} arg {k}: scalar {a!r} ({type(a)}) where {t} expected"
                cargs.append(_CTYPE[t](a))
        # __restrict__ (and plain sanity): an array written by the kernel aliases no other argument
        for x, (kx, ax, *_, cx, _bx) in enumerate(arrays):
            for ky, ay, *_, cy, _by in arrays[x + 1 :]:
                if not (cx and cy):
                    assert not np.may_share_memory(ax, ay), f"{nm}: arguments {kx} and {ky} overlap"
        fn = getattr(self.lib, nm)
        nb, bs = grid[0], block[0]
        for t in _thread_order(self.order, nb * bs, len(self.log)).tolist():
            self.lib.emu_set_1d(nb, 1, bs, t // bs, 0, t % bs)
            fn(*cargs)
        for k, _a, raw, buf, poison, const, before in arrays:
            assert (buf[:EMU_GUARD] == poison).all(), f"{nm}: write before the start of argument {k}"
            assert (buf[EMU_GUARD + raw.size :] == poison).all(), f"{nm}: write past the end of argument {k}"
            body = buf[EMU_GUARD : EMU_GUARD + raw.size]
            if const:
                assert np.array_equal(body, before), f"{nm}: const argument {k} was written"
            else:
                raw[...] = body
        self.log.append((nm, args))


@pytest.fixture(scope="session")
def emulated_kernel():
    """The EmulatedKernel class, for tests that drive host-built kernels through CuPy code."""
    return EmulatedKernel


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
